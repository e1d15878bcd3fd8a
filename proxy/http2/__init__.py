"""HTTP/2: the client connection and its streams, and h2c connections to the app."""
