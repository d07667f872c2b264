"""FedHub control dashboard: ``streamlit run dashboard/index.py`` (or ``fedhub dashboard``).

The page lives in :mod:`fedhub.dashboard.page`; Streamlit runs this script on every
interaction, and each run draws the page anew.
"""

from fedhub.dashboard.page import main

main()
