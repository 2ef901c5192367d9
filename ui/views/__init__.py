"""Page scripts run by st.navigation (kept out of a folder named pages/, which Streamlit would list on the sign-in screen)."""
