"""Helpers the method modules share; no method is registered here.

A method is one module `malloc_ray/methods/<module>.py` (listed in `methods/__init__.py`);
what two or more of them need is written once in this package, with public names:

    glue.py    hyperparameter checks, [kept tokens; own tokens] keys and their masks, HSTU's
               pointwise weights, Native's layers and cost model, the `macs` dict
    chunks.py  target rows and chunked windows of the recompute sequence methods
    prune.py   `TokenPrune`, the base class of the token-pruning methods (h2o, snapkv)
    quant.py   the packed min-max quantizer of the precision methods (kivi, intactkv)
"""
