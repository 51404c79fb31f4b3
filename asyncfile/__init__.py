"""asyncfile: non-blocking file loads for Twisted.

    from asyncfile import FileLoader, read_file
    data = await read_file("photo.jpg")
"""

from ._version import __version__
from .confine import OutsideRoot
from .engines.base import Root
from .errors import ConsumerStopped, ForkedError, LoaderClosed, NotRegularFile, Overloaded
from .handle import FileHandle
from .interfaces import IFileLoader
from .limiter import Limiter, Slot
from .loader import FileLoader, default_loader, read_file
from .reader import FileReader
from .sender import FileSender, FileSenderStopped
from .sendfile import send_file
from .writer import FileConsumer

__all__ = [
    "__version__",
    "FileLoader",
    "FileHandle",
    "Root",
    "IFileLoader",
    "FileReader",
    "Limiter",
    "Slot",
    "Overloaded",
    "NotRegularFile",
    "OutsideRoot",
    "LoaderClosed",
    "ForkedError",
    "ConsumerStopped",
    "read_file",
    "default_loader",
    "FileSender",
    "FileSenderStopped",
    "send_file",
    "FileConsumer",
]
