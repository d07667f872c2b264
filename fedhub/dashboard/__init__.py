"""The Streamlit control dashboard's page (``streamlit run dashboard/index.py`` runs
:mod:`fedhub.dashboard.page`) and the modules it uses."""
