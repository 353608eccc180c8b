"""mlinvert: audit and harden ML prediction APIs against model inversion (OWASP ML03).

Reference: Fredrikson, Jha, Ristenpart, "Model Inversion Attacks that Exploit
Confidence Information and Basic Countermeasures", ACM CCS 2015.
"""

from mlinvert.errors import MlinvertError

__version__ = "0.1.0"
__all__ = ["MlinvertError", "__version__"]
