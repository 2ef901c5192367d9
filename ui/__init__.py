"""Streamlit web UI over the coordinator's store (studies, silos, rounds, evaluations, audit).

Why a separate package: the UI reads and writes the store and reads the coordinator's
files under the state dir only; it never talks to silos, so it can run on another host
against a shared PostgreSQL store. Entry point: `python -m ui --state-dir STATE`.
"""
