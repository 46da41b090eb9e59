"""The commands that drive the libraries: argparse namespace -> typed call -> printed outcome.

The libraries (:mod:`inference`, :mod:`training`) take typed arguments only; each module here
reads the namespace the CLI built, merges it with the config and calls them.
"""
