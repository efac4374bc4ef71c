"""What courierd does on request, whoever asks: the commands (`cli.py`) and the dispatch
API (`edges/api.py`) call the same functions here."""
