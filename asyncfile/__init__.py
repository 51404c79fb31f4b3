"""asyncfile: non-blocking file loads for Twisted.

    from asyncfile import FileLoader, read_file
    data = await read_file("photo.jpg")
"""

from .errors import ConsumerStopped, NotRegularFile, Overloaded
from .limiter import Limiter, Slot
from .interfaces import IFileLoader
from .loader import FileLoader, default_loader, read_file
from .reader import FileReader

__all__ = [
    "FileLoader",
    "IFileLoader",
    "FileReader",
    "Limiter",
    "Slot",
    "Overloaded",
    "NotRegularFile",
    "ConsumerStopped",
    "read_file",
    "default_loader",
]
