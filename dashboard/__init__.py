"""The Streamlit control dashboard (``streamlit run dashboard/index.py``) and the modules it uses."""
