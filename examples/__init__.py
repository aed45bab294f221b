"""The stage scripts (recipes): each file is one stage, read top to bottom.

    python examples/cpt.py ...       or, installed:   qwen-tune cpt ...
"""
