"""troupe: a Python actor runtime for distributed serving.

Workers serve named endpoints; frontends discover them at run time through a discovery plane and
send them requests over a swappable request plane whose answers stream back.
"""

from troupe._version import __version__
from troupe.config import Config
from troupe.runtime import Runtime

__all__ = ["Config", "Runtime", "__version__"]
