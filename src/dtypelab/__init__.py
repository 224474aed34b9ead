"""dtypelab: what happens to my model in precision X?"""

from .errors import DtypelabError
from .formats import NumberFormat, all_formats, get_format

__all__ = ["DtypelabError", "NumberFormat", "all_formats", "get_format"]
__version__ = "0.1.0"
