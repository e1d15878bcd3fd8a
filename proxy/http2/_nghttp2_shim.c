/* The server side of one HTTP/2 connection on libnghttp2, batched for a Python caller (the
 * client side, for h2c to the app, is _nghttp2_client.c, compiled after this file).
 *
 * Python crosses into C once per read (shim_feed: every frame in the bytes is decoded, and
 * what happened is appended to one event buffer that Python reads after the call), once per
 * response part (shim_submit_*: a head as one packed header list, a body chunk, trailers) and
 * once per loop iteration for the output (shim_send: every frame nghttp2 has ready, in one
 * buffer). No callback enters Python.
 *
 * Event record: u8 type, u8 flags, u16 0, u32 stream id, u32 a, u32 b, u32 payload length,
 * then the payload. Packed headers (in events and in submits): u32 count, then count pairs of
 * u32 name length and u32 value length, then the names and values in order. Little-endian
 * (host order: the producer and the consumer are one process).
 *
 * The response body waits here (per stream) while the client's windows are shut: a stream's
 * data provider reads from its buffer and says DEFERRED when it is empty and not ended.
 */

#include <nghttp2/nghttp2.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SHIM_REQUEST 1
#define SHIM_TRAILERS 2
#define SHIM_DATA 3
#define SHIM_END 4
#define SHIM_RESET 5
#define SHIM_SETTINGS 6
#define SHIM_PING 7
#define SHIM_PING_ACK 8
#define SHIM_GOAWAY 9
#define SHIM_UNKNOWN 10
#define SHIM_STREAM_ERROR 11
#define SHIM_WINDOW 13

#define SHIM_FLAG_END_STREAM 1

/* why shim_feed failed (beside nghttp2's own error) */
#define SHIM_FAIL_NONE 0
#define SHIM_FAIL_HEADER_BLOCK 1 /* a header block over the bound (CONTINUATION flood) */
#define SHIM_FAIL_HEADER_LIST 2  /* a decoded header list over max_header_list_size */
#define SHIM_FAIL_STREAM_REUSED 3
#define SHIM_FAIL_NOMEM 4
#define SHIM_FAIL_PADDING 6  /* padding that leaves a HEADERS frame no fragment */
#define SHIM_FAIL_FRAME 7    /* a malformed ALTSVC frame */
#define SHIM_FAIL_PROTOCOL 5 /* nghttp2 ended the connection itself (code in fail_code) */

typedef struct {
  uint8_t *data;
  size_t len, cap, off;
} shim_buf;

static int buf_reserve(shim_buf *b, size_t more) {
  if (b->len + more <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256; /* small: an idle connection keeps what it grew to */
  while (cap < b->len + more) cap *= 2;
  uint8_t *p = realloc(b->data, cap);
  if (p == NULL) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

static int buf_add(shim_buf *b, const void *p, size_t n) {
  if (n == 0) return 0;
  if (buf_reserve(b, n) != 0) return -1;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

/* A buffer that grew for a burst is given back once empty, so idle connections stay small. */
static void buf_trim(shim_buf *b) {
  if (b->len == 0 && b->cap > 65536) {
    free(b->data);
    b->data = NULL;
    b->cap = b->off = 0;
  }
}

static void buf_free(shim_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = b->off = 0;
}

typedef struct shim_stream {
  struct shim_stream *prev, *next; /* every stream of the session: nghttp2_session_del frees
                                      its own without calling on_stream_close */
  shim_buf body;     /* response bytes not yet framed: [off, len) */
  uint8_t *trailers; /* packed trailers waiting behind the body */
  size_t trailers_len;
  int eof;           /* the body ends after what it holds */
  int provider;      /* a data provider is submitted (nghttp2 allows one at a time) */
  int deferred;      /* the provider said DEFERRED: resume it when data comes */
  int reset;         /* the caller reset it */
  int errored;       /* reset for breaking the protocol: nothing more of it is delivered */
  int answered;      /* client side: the final response head came (what follows: trailers) */
  int counted;       /* counted among the open streams (not reset, not refused) */
  int64_t expected;  /* request content-length, -1 when none */
  int64_t received;  /* request DATA bytes */
  int32_t sid;
} shim_stream;

/* A block of nghttp2's with pages of its own (see the allocator below). */
#define PAGED_SLOTS 4
typedef struct {
  void *ptr;
  size_t size;
} paged_block;

typedef struct {
  nghttp2_session *session;
  shim_buf events;
  shim_buf out;
  shim_buf headers_len; /* lengths of the header block being decoded */
  shim_buf headers_val; /* its names and values */
  uint32_t header_count;
  size_t header_list;      /* decoded size, as SETTINGS_MAX_HEADER_LIST_SIZE counts it */
  size_t header_block;     /* encoded size of the block (HEADERS + CONTINUATION) */
  size_t header_limit;     /* bound of both */
  int32_t highest;         /* the highest stream id a client's HEADERS opened */
  int32_t headers_stream;  /* the stream whose header block is being decoded */
  int headers_is_request;
  int64_t headers_length;  /* content-length in the block being decoded, -1 none, -2 bad */
  int fail;
  uint32_t fail_code;
  int in_feed;             /* frames sent now answer the bytes being fed */
  int terminating;         /* the caller ended the connection */
  int out_taken;           /* the caller has the output: the next drain starts afresh */
  uint32_t frame_data;     /* DATA bytes of the frame being received */
  uint32_t ext_len, ext_read, ext_origin; /* an ALTSVC frame's length and origin length */
  size_t waiting;          /* response bytes waiting, all streams */
  shim_stream *streams;
  uint32_t max_streams;    /* the limit the client was told (SETTINGS_MAX_CONCURRENT_STREAMS) */
  uint32_t open_streams;   /* request streams open and not reset: what the limit counts */
  int goaway_sent;         /* our final GOAWAY went out: nghttp2 ignores new streams */
  int goaway_recv;         /* the peer's GOAWAY came: nghttp2 sends no shutdown notice then */
  int notice_pending;      /* a shutdown notice (the drain's first GOAWAY) is on its way */
  int settings_patched;    /* the advertised limit is written into our first SETTINGS */
  nghttp2_mem mem;         /* the allocator below, with this session as its user data */
  paged_block paged[PAGED_SLOTS]; /* the blocks with pages of their own (the frame buffer) */
  int rested;              /* their pages are given back: nothing was written since */
} shim_session;

/* What the client was told it may open, where nghttp2 is given a looser bound (as h2 is in
 * h2_codec.py): nghttp2 1.52 ends the whole connection (GOAWAY PROTOCOL_ERROR) for a stream
 * past the limit the client acknowledged, h2 refuses that stream; here both refuse the stream
 * (REFUSED_STREAM, RFC 9113 5.1.2), and the refused-stream budget counts it. */
#define LOOSE_LIMIT(n) (2 * (n) + 100)

static long live_sessions; /* sessions not yet freed, both sides: what a leak test counts */

static int event(shim_session *s, uint8_t type, uint8_t flags, int32_t sid, uint32_t a,
                 uint32_t b, const void *payload, uint32_t n) {
  uint8_t head[20];
  uint32_t u = (uint32_t)sid;
  head[0] = type;
  head[1] = flags;
  head[2] = head[3] = 0;
  memcpy(head + 4, &u, 4);
  memcpy(head + 8, &a, 4);
  memcpy(head + 12, &b, 4);
  memcpy(head + 16, &n, 4);
  if (buf_reserve(&s->events, sizeof head + n) != 0) return -1;
  buf_add(&s->events, head, sizeof head);
  buf_add(&s->events, payload, n);
  return 0;
}

static int fail(shim_session *s, int why) {
  s->fail = why;
  return NGHTTP2_ERR_CALLBACK_FAILURE;
}

/* The stream no longer counts against the limit: reset, refused, or closed. */
static void uncount(shim_session *s, shim_stream *st) {
  if (st->counted) {
    st->counted = 0;
    s->open_streams--;
  }
}

/* A frame of our own beside nghttp2's, on the output in order: an RST_STREAM for a stream
 * nghttp2 ignores (it has no state for it to reset). */
static int out_taken_reset(shim_session *s);

static int refuse_raw(shim_session *s, int32_t sid) {
  uint8_t f[13] = {0, 0, 4, NGHTTP2_RST_STREAM, 0};
  uint32_t id = (uint32_t)sid & 0x7fffffff;
  f[5] = (uint8_t)(id >> 24), f[6] = (uint8_t)(id >> 16), f[7] = (uint8_t)(id >> 8);
  f[8] = (uint8_t)id;
  f[9] = f[10] = f[11] = 0, f[12] = NGHTTP2_REFUSED_STREAM;
  out_taken_reset(s);
  if (buf_add(&s->out, f, sizeof f) != 0) return -1;
  return event(s, SHIM_STREAM_ERROR, 0, sid, NGHTTP2_REFUSED_STREAM, 0, NULL, 0);
}

/* --- callbacks --------------------------------------------------------------------------------- */

static int on_begin_frame(nghttp2_session *session, const nghttp2_frame_hd *hd, void *user) {
  shim_session *s = user;
  switch (hd->type) {
  case NGHTTP2_HEADERS:
    s->header_block = hd->length;
    if (hd->stream_id > s->highest) {
      s->highest = hd->stream_id;
      /* after our final GOAWAY nghttp2 ignores a new stream without a word; h2 (and the
       * connection) refuse it: so does the shim, the same for both codecs */
      if (s->goaway_sent && !s->terminating && (hd->stream_id & 1) &&
          refuse_raw(s, hd->stream_id) != 0)
        return fail(s, SHIM_FAIL_NOMEM);
    } else if ((hd->stream_id & 1) && hd->stream_id > 0 &&
               nghttp2_session_get_stream_user_data(session, hd->stream_id) == NULL) {
      /* RFC 9113 §5.1.1: a stream id may not be used again */
      return fail(s, SHIM_FAIL_STREAM_REUSED);
    }
    break;
  case NGHTTP2_CONTINUATION:
    s->header_block += hd->length;
    break;
  case NGHTTP2_DATA:
    s->frame_data = 0;
    break;
  default:
    if (hd->type == NGHTTP2_ALTSVC) {
      /* RFC 7838 §4 says a server ignores it; h2 ends the connection for a malformed one, and
       * where the codecs would differ, both refuse */
      s->ext_len = (uint32_t)hd->length;
      s->ext_read = s->ext_origin = 0;
      if (hd->length < 2) return fail(s, SHIM_FAIL_FRAME);
    }
    if (hd->type > NGHTTP2_CONTINUATION) {
      /* frames nghttp2 ignores still cost work: the caller's control budget counts them */
      if (event(s, SHIM_UNKNOWN, 0, hd->stream_id, hd->type, 0, NULL, 0) != 0)
        return fail(s, SHIM_FAIL_NOMEM);
    }
    break;
  }
  if (s->header_block > s->header_limit) return fail(s, SHIM_FAIL_HEADER_BLOCK);
  return 0;
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  shim_session *s = user;
  if (frame->hd.type != NGHTTP2_HEADERS) return 0;
  /* RFC 9113 allows it, h2 (hyperframe) does not: both codecs refuse it alike */
  if ((frame->hd.flags & NGHTTP2_FLAG_PADDED) && !(frame->hd.flags & NGHTTP2_FLAG_PRIORITY) &&
      frame->headers.padlen > 1 && frame->headers.padlen == frame->hd.length)
    return fail(s, SHIM_FAIL_PADDING);
  s->headers_len.len = 0;
  s->headers_val.len = 0;
  s->header_count = 0;
  s->header_list = 0;
  s->headers_stream = frame->hd.stream_id;
  s->headers_is_request = frame->headers.cat == NGHTTP2_HCAT_REQUEST;
  s->headers_length = -1;
  if (s->headers_is_request) {
    shim_stream *st = calloc(1, sizeof *st);
    if (st == NULL) return fail(s, SHIM_FAIL_NOMEM);
    st->expected = -1;
    st->sid = frame->hd.stream_id;
    st->next = s->streams;
    if (s->streams != NULL) s->streams->prev = st;
    s->streams = st;
    nghttp2_session_set_stream_user_data(session, frame->hd.stream_id, st);
    if (s->open_streams >= s->max_streams) {
      /* past the limit the client was told: refused, its header block still decoded */
      st->errored = 1;
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st->sid, NGHTTP2_REFUSED_STREAM);
      if (event(s, SHIM_STREAM_ERROR, 0, st->sid, NGHTTP2_REFUSED_STREAM, 0, NULL, 0) != 0)
        return fail(s, SHIM_FAIL_NOMEM);
    } else {
      st->counted = 1;
      s->open_streams++;
    }
  }
  return 0;
}

static int parse_length(const uint8_t *v, size_t n, int64_t *out) {
  int64_t x = 0;
  if (n == 0 || n > 18) return -1;
  for (size_t i = 0; i < n; i++) {
    if (v[i] < '0' || v[i] > '9') return -1;
    x = x * 10 + (v[i] - '0');
  }
  *out = x;
  return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user) {
  shim_session *s = user;
  uint32_t lens[2] = {(uint32_t)namelen, (uint32_t)valuelen};
  (void)session;
  (void)flags;
  if (frame->hd.type != NGHTTP2_HEADERS) return 0;
  s->header_list += namelen + valuelen + 32;
  if (s->header_list > s->header_limit) return fail(s, SHIM_FAIL_HEADER_LIST);
  if (s->headers_is_request) {
    if (namelen == 14 && memcmp(name, "content-length", 14) == 0) {
      int64_t n;
      if (parse_length(value, valuelen, &n) != 0)
        s->headers_length = -2;
      else if (s->headers_length == -1)
        s->headers_length = n;
      else if (s->headers_length != n)
        s->headers_length = -2;
    }
  }
  if (buf_add(&s->headers_len, lens, sizeof lens) != 0 ||
      buf_add(&s->headers_val, name, namelen) != 0 ||
      buf_add(&s->headers_val, value, valuelen) != 0)
    return fail(s, SHIM_FAIL_NOMEM);
  s->header_count++;
  return 0;
}

static int emit_headers(shim_session *s, uint8_t type, uint8_t flags, int32_t sid) {
  uint32_t n = s->header_count;
  size_t size = 4 + s->headers_len.len + s->headers_val.len;
  uint8_t head[20];
  uint32_t u = (uint32_t)sid, zero = 0, len32 = (uint32_t)size;
  head[0] = type;
  head[1] = flags;
  head[2] = head[3] = 0;
  memcpy(head + 4, &u, 4);
  memcpy(head + 8, &zero, 4);
  memcpy(head + 12, &zero, 4);
  memcpy(head + 16, &len32, 4);
  if (buf_reserve(&s->events, sizeof head + size) != 0) return -1;
  buf_add(&s->events, head, sizeof head);
  buf_add(&s->events, &n, 4);
  buf_add(&s->events, s->headers_len.data, s->headers_len.len);
  buf_add(&s->events, s->headers_val.data, s->headers_val.len);
  return 0;
}

/* A request that broke the protocol on its stream alone: reset it, and say so. */
static int stream_error(shim_session *s, int32_t sid, uint32_t code) {
  shim_stream *st = nghttp2_session_get_stream_user_data(s->session, sid);
  if (st != NULL) {
    st->errored = 1;
    uncount(s, st);
  }
  nghttp2_submit_rst_stream(s->session, NGHTTP2_FLAG_NONE, sid, code);
  return event(s, SHIM_STREAM_ERROR, 0, sid, code, 0, NULL, 0);
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  shim_session *s = user;
  int32_t sid = frame->hd.stream_id;
  uint8_t end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) ? SHIM_FLAG_END_STREAM : 0;
  int rv = 0;
  shim_stream *st;
  switch (frame->hd.type) {
  case NGHTTP2_HEADERS:
    st = nghttp2_session_get_stream_user_data(session, sid);
    if (st != NULL && st->errored) break;
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
      if (st != NULL) {
        st->expected = s->headers_length >= 0 ? s->headers_length : -1;
      }
      rv = emit_headers(s, SHIM_REQUEST, end, sid);
    } else if (frame->headers.cat == NGHTTP2_HCAT_HEADERS) {
      if (!end) {
        /* a second header block that does not end the stream: not trailers (RFC 9113 §8.1) */
        return stream_error(s, sid, NGHTTP2_PROTOCOL_ERROR) ? fail(s, SHIM_FAIL_NOMEM) : 0;
      }
      if (st != NULL && st->expected >= 0 && st->received != st->expected)
        /* trailers end a body shorter than its content-length */
        return stream_error(s, sid, NGHTTP2_PROTOCOL_ERROR) ? fail(s, SHIM_FAIL_NOMEM) : 0;
      rv = emit_headers(s, SHIM_TRAILERS, end, sid);
    }
    break;
  case NGHTTP2_DATA:
    st = nghttp2_session_get_stream_user_data(session, sid);
    if (st != NULL && st->errored) break;
    if (s->frame_data == 0 && !end) rv = event(s, SHIM_DATA, 0, sid, 0, 0, NULL, 0);
    if (end) {
      if (st != NULL && st->expected >= 0 && st->received != st->expected)
        return stream_error(s, sid, NGHTTP2_PROTOCOL_ERROR) ? fail(s, SHIM_FAIL_NOMEM) : 0;
      rv = event(s, SHIM_END, 0, sid, 0, 0, NULL, 0);
    }
    break;
  case NGHTTP2_RST_STREAM:
    rv = event(s, SHIM_RESET, 0, sid, frame->rst_stream.error_code, 0, NULL, 0);
    break;
  case NGHTTP2_SETTINGS:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK)) rv = event(s, SHIM_SETTINGS, 0, 0, 0, 0, NULL, 0);
    break;
  case NGHTTP2_PING:
    rv = event(s, (frame->hd.flags & NGHTTP2_FLAG_ACK) ? SHIM_PING_ACK : SHIM_PING, 0, 0, 0, 0,
               frame->ping.opaque_data, 8);
    break;
  case NGHTTP2_GOAWAY:
    s->goaway_recv = 1;
    rv = event(s, SHIM_GOAWAY, 0, 0, frame->goaway.error_code,
               (uint32_t)frame->goaway.last_stream_id, NULL, 0);
    break;
  case NGHTTP2_WINDOW_UPDATE:
    rv = event(s, SHIM_WINDOW, 0, sid, (uint32_t)frame->window_update.window_size_increment, 0,
               NULL, 0);
    break;
  default:
    break;
  }
  return rv ? fail(s, SHIM_FAIL_NOMEM) : 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t sid,
                         const uint8_t *data, size_t len, void *user) {
  shim_session *s = user;
  shim_stream *st = nghttp2_session_get_stream_user_data(session, sid);
  (void)flags;
  if (st != NULL) {
    if (st->errored) return nghttp2_session_consume(session, sid, len);
    st->received += (int64_t)len;
    if (st->expected >= 0 && st->received > st->expected) {
      /* more than its content-length: this and the rest of its DATA is dropped here */
      nghttp2_session_consume(session, sid, len);
      return stream_error(s, sid, NGHTTP2_PROTOCOL_ERROR) ? fail(s, SHIM_FAIL_NOMEM) : 0;
    }
  }
  s->frame_data += (uint32_t)len;
  /* a: the flow-controlled length the caller acknowledges once the bytes are taken (nghttp2
   * counts padding as consumed itself) */
  return event(s, SHIM_DATA, 0, sid, (uint32_t)len, 0, data, (uint32_t)len)
             ? fail(s, SHIM_FAIL_NOMEM)
             : 0;
}

static int on_invalid_frame(nghttp2_session *session, const nghttp2_frame *frame, int error,
                            void *user) {
  shim_session *s = user;
  (void)session;
  /* a HEADERS nghttp2 refused itself (past SETTINGS_MAX_CONCURRENT_STREAMS): the caller's
   * refused-stream budget counts it as if it had refused the stream */
  if (frame->hd.type == NGHTTP2_HEADERS && error == NGHTTP2_ERR_REFUSED_STREAM)
    return event(s, SHIM_STREAM_ERROR, 0, frame->hd.stream_id, NGHTTP2_REFUSED_STREAM, 0, NULL,
                 0)
               ? fail(s, SHIM_FAIL_NOMEM)
               : 0;
  return 0;
}

static void stream_free(shim_session *s, shim_stream *st) {
  if (st->prev != NULL)
    st->prev->next = st->next;
  else
    s->streams = st->next;
  if (st->next != NULL) st->next->prev = st->prev;
  uncount(s, st);
  s->waiting -= st->body.len - st->body.off;
  buf_free(&st->body);
  free(st->trailers);
  free(st);
}

static int on_stream_close(nghttp2_session *session, int32_t sid, uint32_t code, void *user) {
  shim_stream *st = nghttp2_session_get_stream_user_data(session, sid);
  (void)code;
  if (st != NULL) {
    nghttp2_session_set_stream_user_data(session, sid, NULL);
    stream_free(user, st);
  }
  return 0;
}

/* Frames nghttp2 sends on its own while the bytes are fed: a GOAWAY with an error code is
 * a connection error it found (it reports none otherwise), an RST_STREAM a stream error. */
static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  shim_session *s = user;
  /* as nghttp2 counts it: a GOAWAY other than the drain's first (the shutdown notice) */
  if (frame->hd.type == NGHTTP2_GOAWAY) {
    if (s->notice_pending && frame->goaway.last_stream_id == INT32_MAX)
      s->notice_pending = 0;
    else
      s->goaway_sent = 1;
  }
  if (!s->in_feed) return 0;
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR &&
      !s->terminating && s->fail == SHIM_FAIL_NONE) {
    s->fail = SHIM_FAIL_PROTOCOL;
    s->fail_code = frame->goaway.error_code;
  } else if (frame->hd.type == NGHTTP2_RST_STREAM) {
    shim_stream *st = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (st != NULL && !st->reset && !st->errored) {
      st->errored = 1;
      uncount(s, st);
      event(s, SHIM_STREAM_ERROR, 0, frame->hd.stream_id, frame->rst_stream.error_code, 0, NULL,
            0);
    }
  }
  return 0;
}

/* extension frames are registered so that on_begin_frame sees them; their payload is dropped */
static int on_extension_chunk(nghttp2_session *session, const nghttp2_frame_hd *hd,
                              const uint8_t *data, size_t len, void *user) {
  shim_session *s = user;
  (void)session;
  if (hd->type == NGHTTP2_ALTSVC)
    for (size_t i = 0; i < len && s->ext_read < 2; i++, s->ext_read++)
      s->ext_origin = (s->ext_origin << 8) | data[i];
  return 0;
}

static int unpack_extension(nghttp2_session *session, void **payload, const nghttp2_frame_hd *hd,
                            void *user) {
  shim_session *s = user;
  (void)session, (void)payload;
  if (hd->type == NGHTTP2_ALTSVC && s->ext_origin > s->ext_len - 2) {
    s->fail = SHIM_FAIL_FRAME;
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  return NGHTTP2_ERR_CANCEL;
}

/* --- the response body ------------------------------------------------------------------------- */

static int submit_packed(shim_session *s, int32_t sid, const uint8_t *packed, size_t size,
                         uint8_t flags, int trailer);

static ssize_t read_body(nghttp2_session *session, int32_t sid, uint8_t *out, size_t length,
                         uint32_t *data_flags, nghttp2_data_source *source, void *user) {
  shim_session *s = user;
  shim_stream *st = source->ptr;
  size_t have = st->body.len - st->body.off;
  size_t n = have < length ? have : length;
  (void)session;
  memcpy(out, st->body.data + st->body.off, n);
  st->body.off += n;
  s->waiting -= n;
  if (st->body.off == st->body.len) st->body.off = st->body.len = 0;
  if (n == have && st->eof) {
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
    if (st->trailers != NULL) {
      *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
      submit_packed(s, sid, st->trailers, st->trailers_len, NGHTTP2_FLAG_END_STREAM, 1);
      free(st->trailers);
      st->trailers = NULL;
    }
    st->provider = 0;
    return (ssize_t)n;
  }
  if (n == 0) {
    st->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  return (ssize_t)n;
}

/* --- the API Python calls ---------------------------------------------------------------------- */

typedef struct {
  uint32_t max_concurrent_streams;
  uint32_t header_limit;
  uint32_t stream_window;
  uint32_t connection_window;
} shim_config;

static nghttp2_session_callbacks *callbacks;
static nghttp2_option *options;

static int setup(void) {
  if (callbacks != NULL) return 0;
  if (nghttp2_session_callbacks_new(&callbacks) != 0) return -1;
  nghttp2_session_callbacks_set_on_begin_frame_callback(callbacks, on_begin_frame);
  nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data_chunk);
  nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(callbacks, on_invalid_frame);
  nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(callbacks, on_frame_send);
  nghttp2_session_callbacks_set_on_extension_chunk_recv_callback(callbacks, on_extension_chunk);
  nghttp2_session_callbacks_set_unpack_extension_callback(callbacks, unpack_extension);
  if (nghttp2_option_new(&options) != 0) return -1;
  /* Request checks are the caller's (the same for every codec), so that a malformed request
   * resets its stream and reaches the caller's budgets; nghttp2's own would reset it silently. */
  nghttp2_option_set_no_http_messaging(options, 1);
  /* The caller acknowledges request bytes once the app took them (backpressure). */
  nghttp2_option_set_no_auto_window_update(options, 1);
  /* A closed stream is not kept (nghttp2 keeps some for the priority tree, which RFC 9113
   * deprecates): less memory per connection. A HEADERS frame on a closed stream's id is still
   * refused (on_begin_frame: a stream id used again); DATA on a closed stream is ignored (and
   * its bytes credited to the connection's window) where a kept one answered STREAM_CLOSED,
   * as h2 does, which RFC 9113 §5.1 allows. */
  nghttp2_option_set_no_closed_streams(options, 1);
  /* HEADERS blocks are bounded here as they arrive, whatever the CONTINUATION count. */
  for (int type = NGHTTP2_CONTINUATION + 1; type <= 0xff; type++)
    nghttp2_option_set_user_recv_extension_type(options, (uint8_t)type);
  return 0;
}

/* nghttp2's allocator for a server session. nghttp2 allocates its 16 KiB outbound frame buffer
 * with the session and writes it only as far as frames go; from malloc it would take memory a
 * TLS handshake just freed, resident in full for the connection's life (an idle connection's
 * frames fill a page of it). Blocks that large get pages of their own, which stay untouched,
 * and not resident, until written, and which the session gives back when it goes idle
 * (shim_send): the session keeps where they are, so that nothing of ours is written into
 * them. Smaller ones (streams, HPACK entries) come from malloc, headed by their size. */
#define PAGED_FROM 16384
typedef struct {
  size_t size;
} block_head;
#define HEAD_SIZE ((sizeof(block_head) + 15) & ~(size_t)15) /* malloc's alignment kept */

static paged_block *paged_find(shim_session *s, void *ptr) {
  for (int i = 0; i < PAGED_SLOTS; i++)
    if (s->paged[i].ptr == ptr) return &s->paged[i];
  return NULL;
}

static void *block_alloc(shim_session *s, size_t size, int zeroed) {
  block_head *head;
  if (size > SIZE_MAX - HEAD_SIZE) return NULL;
  if (size >= PAGED_FROM) {
    paged_block *slot = paged_find(s, NULL);
    if (slot != NULL) { /* else (more large blocks than slots) from malloc */
      void *pages = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                         0); /* zeroed by the kernel */
      if (pages == MAP_FAILED) return NULL;
      slot->ptr = pages;
      slot->size = size;
      return pages;
    }
  }
  head = zeroed ? calloc(1, HEAD_SIZE + size) : malloc(HEAD_SIZE + size);
  if (head == NULL) return NULL;
  head->size = size;
  return (char *)head + HEAD_SIZE;
}

static void block_free(void *ptr, void *user_data) {
  paged_block *slot;
  if (ptr == NULL) return;
  slot = paged_find(user_data, ptr);
  if (slot != NULL) {
    munmap(ptr, slot->size);
    slot->ptr = NULL;
  } else {
    free((char *)ptr - HEAD_SIZE);
  }
}

static void *block_malloc(size_t size, void *user_data) {
  return block_alloc(user_data, size, 0);
}

static void *block_calloc(size_t count, size_t size, void *user_data) {
  if (size != 0 && count > SIZE_MAX / size) return NULL;
  return block_alloc(user_data, count * size, 1);
}

static void *block_realloc(void *ptr, size_t size, void *user_data) {
  paged_block *slot;
  block_head *head;
  size_t old;
  void *moved;
  if (ptr == NULL) return block_alloc(user_data, size, 0);
  slot = paged_find(user_data, ptr);
  if (slot == NULL && size < PAGED_FROM) {
    if (size > SIZE_MAX - HEAD_SIZE) return NULL;
    head = realloc((char *)ptr - HEAD_SIZE, HEAD_SIZE + size);
    if (head == NULL) return NULL;
    head->size = size;
    return (char *)head + HEAD_SIZE;
  }
  old = slot != NULL ? slot->size : ((block_head *)((char *)ptr - HEAD_SIZE))->size;
  moved = block_alloc(user_data, size, 0);
  if (moved == NULL) return NULL;
  memcpy(moved, ptr, old < size ? old : size);
  block_free(ptr, user_data);
  return moved;
}

static const nghttp2_mem paged_mem = {NULL, block_malloc, block_free, block_calloc,
                                      block_realloc};

/* An idle session's large blocks give their pages back (zero-filled when next written): the
 * frame buffer's written page is an idle connection's. Only with nothing to send, so that no
 * frame waits in them. */
static void rest(shim_session *s) {
  if (s->rested || s->open_streams != 0 || nghttp2_session_want_write(s->session)) return;
  for (int i = 0; i < PAGED_SLOTS; i++)
    if (s->paged[i].ptr != NULL) madvise(s->paged[i].ptr, s->paged[i].size, MADV_DONTNEED);
  s->rested = 1;
}

shim_session *shim_new(const shim_config *config) {
  shim_session *s;
  nghttp2_settings_entry iv[3];
  if (setup() != 0) return NULL;
  s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->header_limit = config->header_limit;
  s->max_streams = config->max_concurrent_streams;
  s->mem = paged_mem;
  s->mem.mem_user_data = s; /* nghttp2 keeps a copy: the session's blocks are found in s */
  if (nghttp2_session_server_new3(&s->session, callbacks, s, options, &s->mem) != 0) {
    free(s);
    return NULL;
  }
  iv[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS;
  iv[0].value = LOOSE_LIMIT(config->max_concurrent_streams); /* told: the strict one */
  iv[1].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE;
  iv[1].value = config->header_limit;
  iv[2].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE;
  iv[2].value = config->stream_window;
  if (nghttp2_submit_settings(s->session, NGHTTP2_FLAG_NONE, iv, 3) != 0 ||
      nghttp2_session_set_local_window_size(s->session, NGHTTP2_FLAG_NONE, 0,
                                            (int32_t)config->connection_window) != 0) {
    nghttp2_session_del(s->session);
    free(s);
    return NULL;
  }
  live_sessions++;
  return s;
}

void shim_free(shim_session *s) {
  if (s == NULL) return;
  live_sessions--;
  nghttp2_session_del(s->session);
  while (s->streams != NULL) stream_free(s, s->streams);
  buf_free(&s->events);
  buf_free(&s->out);
  buf_free(&s->headers_len);
  buf_free(&s->headers_val);
  free(s);
}

static int out_taken_reset(shim_session *s) {
  if (s->out_taken) {
    s->out.len = 0;
    s->out_taken = 0;
    buf_trim(&s->out);
  }
  return 0;
}

/* Our first SETTINGS (a server's first frame) says the strict limit, not nghttp2's loose one. */
static void patch_limit(shim_session *s, uint8_t *frame, size_t n) {
  size_t length, at;
  s->settings_patched = 1;
  if (n < 9 || frame[3] != NGHTTP2_SETTINGS) return;
  length = ((size_t)frame[0] << 16) | ((size_t)frame[1] << 8) | frame[2];
  for (at = 9; at + 6 <= 9 + length && at + 6 <= n; at += 6) {
    if (frame[at] == 0 && frame[at + 1] == NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) {
      uint32_t v = s->max_streams;
      frame[at + 2] = (uint8_t)(v >> 24), frame[at + 3] = (uint8_t)(v >> 16);
      frame[at + 4] = (uint8_t)(v >> 8), frame[at + 5] = (uint8_t)v;
    }
  }
}

/* Serialize what nghttp2 has ready onto the output. */
static int drain(shim_session *s) {
  out_taken_reset(s);
  for (;;) {
    const uint8_t *p;
    size_t start = s->out.len;
    ssize_t n = nghttp2_session_mem_send(s->session, &p);
    if (n < 0) return (int)n;
    if (n == 0) return 0;
    if (buf_add(&s->out, p, (size_t)n) != 0) return NGHTTP2_ERR_NOMEM;
    if (!s->settings_patched && nghttp2_session_check_server_session(s->session))
      patch_limit(s, s->out.data + start, (size_t)n);
  }
}

/* Decode what the client sent. Returns 0, or a negative nghttp2 error, or 1 when nghttp2 ended
 * the connection itself (*why and *code say why; the GOAWAY is in the output). The events are in
 * *events, *events_len. What nghttp2 answers at once (SETTINGS and PING acknowledgements, its
 * resets and GOAWAY) is serialized here already, so that its own errors are seen. */
int shim_feed(shim_session *s, const char *data, size_t len, const char **events,
              size_t *events_len, int *why, uint32_t *code) {
  ssize_t rv;
  int sent;
  s->events.len = 0;
  buf_trim(&s->events);
  s->fail = SHIM_FAIL_NONE;
  s->fail_code = 0;
  rv = nghttp2_session_mem_recv(s->session, (const uint8_t *)data, len);
  s->in_feed = 1;
  sent = drain(s);
  s->in_feed = 0;
  *events = (const char *)s->events.data;
  *events_len = s->events.len;
  *why = s->fail;
  *code = s->fail_code;
  if (rv < 0) return (int)rv;
  if (sent < 0) return sent;
  return s->fail == SHIM_FAIL_NONE ? 0 : 1;
}

/* Every frame ready to go, in one buffer (valid until the next call). */
int shim_send(shim_session *s, const char **out, size_t *out_len) {
  int rv = drain(s);
  *out = (const char *)s->out.data;
  *out_len = s->out.len;
  s->out_taken = 1;
  if (s->out.len) s->rested = 0; /* frames went through the frame buffer */
  if (rv == 0) rest(s);
  return rv;
}

/* A packed header list as nghttp2's name/value array (pointing into `packed`): in `stack` for
 * up to 32 fields, else allocated (the caller frees *nva when it is not `stack`). */
static int unpack_nv(const uint8_t *packed, size_t size, nghttp2_nv *stack, nghttp2_nv **nva,
                     uint32_t *count) {
  uint32_t n, i;
  const uint32_t *lens;
  const uint8_t *p;
  if (size < 4) return NGHTTP2_ERR_INVALID_ARGUMENT;
  memcpy(&n, packed, 4);
  if (size < 4 + 8 * (size_t)n) return NGHTTP2_ERR_INVALID_ARGUMENT;
  lens = (const uint32_t *)(packed + 4);
  p = packed + 4 + 8 * (size_t)n;
  *nva = stack;
  if (n > 32 && (*nva = malloc(sizeof **nva * n)) == NULL) return NGHTTP2_ERR_NOMEM;
  for (i = 0; i < n; i++) {
    uint32_t nl, vl;
    memcpy(&nl, lens + 2 * i, 4);
    memcpy(&vl, lens + 2 * i + 1, 4);
    if ((size_t)(p - packed) + nl + vl > size) {
      if (*nva != stack) free(*nva);
      return NGHTTP2_ERR_INVALID_ARGUMENT;
    }
    (*nva)[i].name = (uint8_t *)p;
    (*nva)[i].namelen = nl;
    (*nva)[i].value = (uint8_t *)p + nl;
    (*nva)[i].valuelen = vl;
    (*nva)[i].flags = NGHTTP2_NV_FLAG_NONE;
    p += nl + vl;
  }
  *count = n;
  return 0;
}

static int submit_packed(shim_session *s, int32_t sid, const uint8_t *packed, size_t size,
                         uint8_t flags, int trailer) {
  nghttp2_nv stack[32], *nva;
  uint32_t n;
  int rv = unpack_nv(packed, size, stack, &nva, &n);
  if (rv != 0) return rv;
  if (trailer)
    rv = nghttp2_submit_trailer(s->session, sid, nva, n);
  else
    rv = nghttp2_submit_headers(s->session, flags, sid, NULL, nva, n, NULL);
  if (nva != stack) free(nva);
  return rv < 0 ? rv : 0;
}

/* A response head (or a 1xx): packed headers, :status first. */
int shim_submit_headers(shim_session *s, int32_t sid, const char *packed, size_t size,
                        int end_stream) {
  if (nghttp2_session_get_stream_user_data(s->session, sid) == NULL)
    return NGHTTP2_ERR_STREAM_CLOSED;
  return submit_packed(s, sid, (const uint8_t *)packed, size,
                       end_stream ? NGHTTP2_FLAG_END_STREAM : NGHTTP2_FLAG_NONE, 0);
}

int64_t shim_waiting(shim_session *s, int32_t sid);

/* Body bytes (and the end): sent as the client's windows allow, the rest waits here. Returns
 * what the windows have no room for on this stream, or a negative nghttp2 error. */
int64_t shim_submit_data(shim_session *s, int32_t sid, const char *data, size_t len,
                         int end_stream) {
  shim_stream *st = nghttp2_session_get_stream_user_data(s->session, sid);
  if (st == NULL || st->eof) return NGHTTP2_ERR_STREAM_CLOSED;
  if (buf_add(&st->body, data, len) != 0) return NGHTTP2_ERR_NOMEM;
  s->waiting += len;
  if (end_stream) st->eof = 1;
  if (!st->provider) {
    nghttp2_data_provider provider;
    int rv;
    provider.source.ptr = st;
    provider.read_callback = read_body;
    /* END_STREAM whenever read_body says EOF (it says so only once st->eof is set, and holds
     * the flag back itself for trailers): nghttp2 takes the flag from this call only, so an
     * end submitted after the body would otherwise never end the stream */
    rv = nghttp2_submit_data(s->session, NGHTTP2_FLAG_END_STREAM, sid, &provider);
    if (rv != 0) return rv;
    st->provider = 1;
    st->deferred = 0;
  } else if (st->deferred) {
    st->deferred = 0;
    nghttp2_session_resume_data(s->session, sid);
  }
  return shim_waiting(s, sid);
}

/* Trailers end the stream once the body that waits has gone out. */
int shim_submit_trailers(shim_session *s, int32_t sid, const char *packed, size_t size) {
  shim_stream *st = nghttp2_session_get_stream_user_data(s->session, sid);
  if (st == NULL || st->eof) return NGHTTP2_ERR_STREAM_CLOSED;
  if (!st->provider)
    return submit_packed(s, sid, (const uint8_t *)packed, size, NGHTTP2_FLAG_END_STREAM, 1);
  st->trailers = malloc(size);
  if (st->trailers == NULL) return NGHTTP2_ERR_NOMEM;
  memcpy(st->trailers, packed, size);
  st->trailers_len = size;
  st->eof = 1;
  if (st->deferred) {
    st->deferred = 0;
    nghttp2_session_resume_data(s->session, sid);
  }
  return 0;
}

static int64_t excess(shim_session *s, int32_t sid, shim_stream *st, int64_t room) {
  int64_t have = (int64_t)(st->body.len - st->body.off);
  int32_t window = nghttp2_session_get_stream_remote_window_size(s->session, sid);
  if (window < room) room = window;
  if (room < 0) room = 0;
  return have > room ? have - room : 0;
}

/* What the client's windows have no room for now: what waits on the stream past its window
 * and the connection's (0: the sum over the streams). The rest goes out at the next
 * shim_send. */
int64_t shim_waiting(shim_session *s, int32_t sid) {
  int64_t room = nghttp2_session_get_remote_window_size(s->session), sum = 0;
  shim_stream *st;
  if (sid != 0) {
    st = nghttp2_session_get_stream_user_data(s->session, sid);
    return st == NULL ? 0 : excess(s, sid, st, room);
  }
  if (s->waiting == 0) return 0;
  for (st = s->streams; st != NULL; st = st->next)
    if (st->body.len > st->body.off) sum += excess(s, st->sid, st, room);
  return sum;
}

int shim_is_open(shim_session *s, int32_t sid) {
  return nghttp2_session_get_stream_user_data(s->session, sid) != NULL;
}

int shim_reset(shim_session *s, int32_t sid, uint32_t code) {
  shim_stream *st = nghttp2_session_get_stream_user_data(s->session, sid);
  if (st != NULL) {
    st->reset = 1;
    uncount(s, st);
  }
  return nghttp2_submit_rst_stream(s->session, NGHTTP2_FLAG_NONE, sid, code);
}

/* A GOAWAY that lets the streams up to last_sid finish (a drain), or, with terminate, the end
 * of the connection (nothing but the GOAWAY is sent after it). */
int shim_goaway(shim_session *s, uint32_t code, int32_t last_sid, int terminate) {
  if (code != NGHTTP2_NO_ERROR) s->terminating = 1; /* ours, not a connection error found */
  if (terminate) {
    s->terminating = 1;
    return nghttp2_session_terminate_session2(s->session, last_sid, code);
  }
  /* the drain's first GOAWAY: new streams are still taken (nghttp2 would ignore them all
   * after any other GOAWAY, where h2 serves them); nghttp2 drops a notice silently once the
   * peer said GOAWAY, so then it is a plain one (the connection refuses new streams anyway) */
  if (code == NGHTTP2_NO_ERROR && last_sid == INT32_MAX && !s->goaway_recv &&
      nghttp2_session_check_server_session(s->session)) {
    s->notice_pending = 1;
    return nghttp2_submit_shutdown_notice(s->session);
  }
  return nghttp2_submit_goaway(s->session, NGHTTP2_FLAG_NONE, last_sid, code, NULL, 0);
}

int shim_ping(shim_session *s, const char *opaque) {
  return nghttp2_submit_ping(s->session, NGHTTP2_FLAG_NONE, (const uint8_t *)opaque);
}

/* Request bytes taken: the client's windows reopen (a closed stream's: the connection's). */
int shim_consume(shim_session *s, int32_t sid, size_t size) {
  if (nghttp2_session_get_stream_user_data(s->session, sid) == NULL)
    return nghttp2_session_consume_connection(s->session, size);
  return nghttp2_session_consume(s->session, sid, size);
}

int32_t shim_highest(shim_session *s) { return s->highest; }

int shim_want(shim_session *s) {
  return nghttp2_session_want_read(s->session) || nghttp2_session_want_write(s->session);
}

const char *shim_version(void) { return nghttp2_version(0)->version_str; }
