"""tpc's version, in a module of its own so that what records it (recipes, tune) need not import tpc."""

__version__ = "0.1.0"
