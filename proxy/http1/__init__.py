"""HTTP/1.1: the codecs (httptools, h11), the client connection, the app connections."""
