"""Streamlit web UI over the coordinator's store (studies, silos, rounds, evaluations, audit).

Why a separate package: the UI reads and writes the store and reads the coordinator's
files under the state dir only; it never talks to silos, so it can run on another host
against a shared PostgreSQL store. Entry point: `python -m ui --state-dir STATE`.
"""

from policies.yamlsafe import MAX_POLICY_BYTES

# Streamlit's own upload cap (`server.maxUploadSize`, in MB; its default is 200 MB), set on the
# policy uploader and passed by `coordinator ui`: a study policy is text far below 1 MB, and
# `MAX_POLICY_BYTES` refuses anything between that and this cap with our own message.
UPLOAD_LIMIT_MB = max(1, -(-MAX_POLICY_BYTES // 1_000_000))
