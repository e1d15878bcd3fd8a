/* The client side of one HTTP/2 connection (h2c to the app) on libnghttp2, batched as the
 * server side in _nghttp2_shim.c is (this file is compiled after it, in one unit, and shares
 * its session, buffers, event records, request-body provider and submits).
 *
 * Python crosses into C once per read (shimc_feed: the app's answers, as event records), once
 * per request part (shimc_request: a head as one packed header list, then shim_submit_data /
 * shim_submit_trailers for the body) and once per loop iteration for the output (shim_send).
 * nghttp2's HTTP checks are on here: a malformed answer resets its stream (PROTOCOL_ERROR),
 * which the caller hears of as a stream error and answers 502.
 */

#define SHIM_RESPONSE 14
#define SHIM_INFORMATIONAL 15

static int on_begin_frame_c(nghttp2_session *session, const nghttp2_frame_hd *hd, void *user) {
  shim_session *s = user;
  (void)session;
  if (hd->type == NGHTTP2_HEADERS)
    s->header_block = hd->length;
  else if (hd->type == NGHTTP2_CONTINUATION)
    s->header_block += hd->length;
  else if (hd->type == NGHTTP2_DATA)
    s->frame_data = 0;
  if (s->header_block > s->header_limit) return fail(s, SHIM_FAIL_HEADER_BLOCK);
  return 0;
}

static int on_begin_headers_c(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  shim_session *s = user;
  (void)session;
  s->headers_len.len = 0;
  s->headers_val.len = 0;
  s->header_count = 0;
  s->header_list = 0;
  s->headers_stream = frame->hd.stream_id;
  s->headers_is_request = 0; /* here: the block is a 1xx head */
  return 0;
}

static int on_header_c(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                       size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                       void *user) {
  shim_session *s = user;
  uint32_t lens[2] = {(uint32_t)namelen, (uint32_t)valuelen};
  (void)session;
  (void)flags;
  if (frame->hd.type != NGHTTP2_HEADERS) return 0;
  s->header_list += namelen + valuelen + 32;
  if (s->header_list > s->header_limit) return fail(s, SHIM_FAIL_HEADER_LIST);
  if (namelen == 7 && memcmp(name, ":status", 7) == 0 && valuelen > 0 && value[0] == '1')
    s->headers_is_request = 1;
  if (buf_add(&s->headers_len, lens, sizeof lens) != 0 ||
      buf_add(&s->headers_val, name, namelen) != 0 ||
      buf_add(&s->headers_val, value, valuelen) != 0)
    return fail(s, SHIM_FAIL_NOMEM);
  s->header_count++;
  return 0;
}

static int on_frame_recv_c(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  shim_session *s = user;
  int32_t sid = frame->hd.stream_id;
  uint8_t end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) ? SHIM_FLAG_END_STREAM : 0;
  shim_stream *st;
  uint8_t type;
  if (frame->hd.type == NGHTTP2_PING) return 0; /* answered by nghttp2; nothing to count */
  if (frame->hd.type != NGHTTP2_HEADERS) return on_frame_recv(session, frame, user);
  st = nghttp2_session_get_stream_user_data(session, sid);
  if (st == NULL || st->errored) return 0;
  if (s->headers_is_request) {
    type = SHIM_INFORMATIONAL;
  } else if (!st->answered) {
    type = SHIM_RESPONSE;
    st->answered = 1;
  } else {
    type = SHIM_TRAILERS;
  }
  return emit_headers(s, type, end, sid) ? fail(s, SHIM_FAIL_NOMEM) : 0;
}

static nghttp2_session_callbacks *client_callbacks;
static nghttp2_option *client_options;

static int setup_client(void) {
  nghttp2_session_callbacks *cb;
  if (client_callbacks != NULL) return 0;
  if (nghttp2_session_callbacks_new(&cb) != 0) return -1;
  nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame_c);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers_c);
  nghttp2_session_callbacks_set_on_header_callback(cb, on_header_c);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv_c);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
  if (nghttp2_option_new(&client_options) != 0) {
    nghttp2_session_callbacks_del(cb);
    return -1;
  }
  /* The caller acknowledges response bytes once its client took them (backpressure). */
  nghttp2_option_set_no_auto_window_update(client_options, 1);
  client_callbacks = cb;
  return 0;
}

shim_session *shimc_new(const shim_config *config) {
  shim_session *s;
  nghttp2_settings_entry iv[3];
  if (setup_client() != 0) return NULL;
  s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->header_limit = config->header_limit;
  if (nghttp2_session_client_new2(&s->session, client_callbacks, s, client_options) != 0) {
    free(s);
    return NULL;
  }
  iv[0].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH;
  iv[0].value = 0;
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

/* A request head on a new stream; its body follows through shim_submit_data (the stream's
 * provider says DEFERRED until it comes) unless end_stream. Returns the stream id, or a
 * negative nghttp2 error. The head is framed at once, so that the stream is open for the
 * body submitted before the next shim_send. */
int32_t shimc_request(shim_session *s, const char *packed, size_t size, int end_stream) {
  nghttp2_nv stack[32], *nva;
  nghttp2_data_provider provider;
  shim_stream *st;
  uint32_t n;
  int32_t sid = unpack_nv((const uint8_t *)packed, size, stack, &nva, &n);
  if (sid != 0) return sid;
  st = calloc(1, sizeof *st);
  if (st == NULL) {
    if (nva != stack) free(nva);
    return NGHTTP2_ERR_NOMEM;
  }
  st->expected = -1;
  st->eof = end_stream != 0;
  st->provider = end_stream == 0;
  provider.source.ptr = st;
  provider.read_callback = read_body;
  sid = nghttp2_submit_request(s->session, NULL, nva, n, end_stream ? NULL : &provider, st);
  if (nva != stack) free(nva);
  if (sid < 0) {
    free(st);
    return sid;
  }
  st->sid = sid;
  st->next = s->streams;
  if (s->streams != NULL) s->streams->prev = st;
  s->streams = st; /* freed by on_stream_close, or with the session */
  if (drain(s) < 0 || nghttp2_session_get_stream_user_data(s->session, sid) != st) {
    /* not opened (the app's GOAWAY came first): it never will be */
    st->reset = 1;
    nghttp2_submit_rst_stream(s->session, NGHTTP2_FLAG_NONE, sid, NGHTTP2_CANCEL);
    return NGHTTP2_ERR_STREAM_CLOSED;
  }
  return sid;
}

/* Reopen a window by what the caller took: the connection's (sid 0) or a stream's alone. */
int shimc_consume_part(shim_session *s, int32_t sid, size_t size) {
  if (sid == 0) return nghttp2_session_consume_connection(s->session, size);
  if (nghttp2_session_get_stream_user_data(s->session, sid) == NULL) return 0;
  return nghttp2_session_consume_stream(s->session, sid, size);
}

uint32_t shimc_max_streams(shim_session *s) {
  return nghttp2_session_get_remote_settings(s->session,
                                             NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
}

long shim_live_sessions(void) { return live_sessions; }
