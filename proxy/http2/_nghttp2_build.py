"""cffi (API mode) build of `proxy.http2._nghttp2`: the C shim in `_nghttp2_shim.c` (server
side) and `_nghttp2_client.c` (h2c client side) on the
system libnghttp2. setup.py names it in `cffi_modules`; the extension is optional, so an install
without a C compiler or libnghttp2's headers still succeeds (HTTP/2 then runs on `h2`)."""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

CDEF = """
typedef struct shim_session shim_session;
typedef struct {
  uint32_t max_concurrent_streams;
  uint32_t header_limit;
  uint32_t stream_window;
  uint32_t connection_window;
} shim_config;

shim_session *shim_new(const shim_config *config);
void shim_free(shim_session *s);
int shim_feed(shim_session *s, const char *data, size_t len, const char **events,
              size_t *events_len, int *why, uint32_t *code);
int shim_send(shim_session *s, const char **out, size_t *out_len);
int shim_submit_headers(shim_session *s, int32_t sid, const char *packed, size_t size,
                        int end_stream);
int64_t shim_submit_data(shim_session *s, int32_t sid, const char *data, size_t len,
                         int end_stream);
int shim_submit_trailers(shim_session *s, int32_t sid, const char *packed, size_t size);
int64_t shim_waiting(shim_session *s, int32_t sid);
int shim_is_open(shim_session *s, int32_t sid);
int shim_reset(shim_session *s, int32_t sid, uint32_t code);
int shim_goaway(shim_session *s, uint32_t code, int32_t last_sid, int terminate);
int shim_ping(shim_session *s, const char *opaque);
int shim_consume(shim_session *s, int32_t sid, size_t size);
int32_t shim_highest(shim_session *s);
const char *shim_version(void);
shim_session *shimc_new(const shim_config *config);
int32_t shimc_request(shim_session *s, const char *packed, size_t size, int end_stream);
int shimc_consume_part(shim_session *s, int32_t sid, size_t size);
uint32_t shimc_max_streams(shim_session *s);
long shim_live_sessions(void);
const char *nghttp2_strerror(int lib_error_code);
"""

HERE = Path(__file__).parent
ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "proxy.http2._nghttp2",
    # one unit: the client side shares the server side's session, buffers and submits
    "\n".join((HERE / name).read_text() for name in ("_nghttp2_shim.c", "_nghttp2_client.c")),
    libraries=["nghttp2"],
    extra_compile_args=["-O2"],
    # a build that fails (no compiler, no nghttp2.h) leaves the extension out, not the install
    optional=True,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
