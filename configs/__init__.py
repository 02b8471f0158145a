"""Experiment configs: `python main.py --config=configs/<file>.py --workdir=...`."""
