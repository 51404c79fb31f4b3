"""twistd plugin: ``twistd -n imgserver [options]`` (see ``twistd imgserver --help``)."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _ImageServerMaker:
    tapname = "imgserver"
    description = "Image server over HTTP and Perspective Broker, on asyncfile."

    @property
    def options(self):
        from imgserver.twistd import Options

        return Options

    def makeService(self, options):
        from imgserver.twistd import make_service

        return make_service(options)


serviceMaker = _ImageServerMaker()
