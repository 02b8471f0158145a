"""Experiment configs: `python main.py --config=configs/<file>.py[:key=value,...] --workdir=...`.

pairs.py is the table of the paper's teacher -> student pairs (each pair file names its row);
args.py parses the `:key=value[,key=value]` argument of the parameterised configs.
"""
