"""metactr: CTR prediction under the generalized cold start, with meta-learning."""

__version__ = "0.1.0"
