"""The optional C extension (the nghttp2 HTTP/2 codec); everything else is in pyproject.toml.

cffi builds `proxy.http2._nghttp2` from `proxy/http2/_nghttp2_build.py`; the extension is
marked optional there, so without a C compiler or libnghttp2's headers the install succeeds
and HTTP/2 runs on the pure-Python `h2`."""

from setuptools import setup

setup(cffi_modules=["proxy/http2/_nghttp2_build.py:ffi"])
