"""`tls-sidecar` as a user runs it: one-line errors, environment variables, defaults, the demo."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WsRequest

from proxy import compiled
from proxy.tls import certs
from tests.support.proxy import DevCerts, ProxyProcess, https, serve_args, wait_for
from tests.support.upstream import UpstreamApp

REPO = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr}"
    assert lines[0].startswith("tls-sidecar: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    out = tmp_path_factory.mktemp("other")
    ca = certs.create_ca("other CA")
    leaf = certs.issue(ca, ["localhost"])
    (out / "ca.crt").write_bytes(ca.cert_pem)
    (out / "tls.crt").write_bytes(leaf.cert_pem)
    certs.write_private(out / "tls.key", leaf.key_pem)
    return DevCerts(out / "ca.crt", out / "tls.crt", out / "tls.key", out)


def pair_on_disk(
    folder: Path, name: str, *, not_before_days: float, days: int = 1
) -> tuple[str, str]:
    """A leaf valid from `not_before_days` from now for `days`, written as NAME.crt / NAME.key."""
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=not_before_days)
    leaf = certs.issue(certs.create_ca(), ["localhost"], days=days, not_before=start)
    (folder / f"{name}.crt").write_bytes(leaf.cert_pem)
    certs.write_private(folder / f"{name}.key", leaf.key_pem)
    return str(folder / f"{name}.crt"), str(folder / f"{name}.key")


def serve(*args: str) -> list[str]:
    return ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *args]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["serve", "--listen", "nope"], ["--listen", "HOST:PORT"]),
        (["serve", "--listen", "1.2.3.4:99999"], ["--listen", "0-65535"]),
        (["serve", "--upstream", "https://app:8080"], ["--upstream", "http://"]),
        (["serve", "--idle-timeout", "5x"], ["--idle-timeout", "10s"]),
        (["serve", "--max-body-bytes", "lots"], ["--max-body-bytes", "MiB"]),
        (
            ["serve", "--cert", "/nonexistent/tls.crt", "--key", "/nonexistent/tls.key"],
            ["--cert", "does not exist"],
        ),
        (["serve", "--tls-min-version", "1.0"], ["1.0", "1.2"]),
        (
            ["serve", "--listen", "127.0.0.1:9000", "--admin-listen", "127.0.0.1:9000"],
            ["--admin-listen", "differ"],
        ),
        (["serve", "--no-such-flag"], ["--no-such-flag", "--help"]),
    ],
)
def test_bad_flags_stop_with_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli(*args), *fragments)


# `serve` where the nghttp2 extension does not load (an install without a C compiler)
_WITHOUT_NGHTTP2 = (
    "import sys; sys.modules['proxy.http2._nghttp2'] = None; "
    "from proxy.cli import main; main(sys.argv[1:])"
)


@pytest.mark.parametrize(
    "args",
    [
        ["--upstream", "http://127.0.0.1:8080"],  # HTTP/2 to clients
        ["--no-http2", "--upstream", "h2c://127.0.0.1:50051"],  # HTTP/2 to the app only
    ],
)
def test_nghttp2_asked_for_but_not_built_stops_start_up(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_NGHTTP2, *serve("--http2-codec", "nghttp2", *args)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert_one_line_error(result, "--http2-codec nghttp2", "libnghttp2-dev", "--http2-codec h2")


def test_cert_without_key(dev_certs: DevCerts) -> None:
    assert_one_line_error(run_cli("serve", "--cert", str(dev_certs.cert)), "--cert", "--key")


def test_key_that_does_not_match(dev_certs: DevCerts, other_pair: DevCerts) -> None:
    result = run_cli(*serve("--cert", str(dev_certs.cert), "--key", str(other_pair.key)))
    assert_one_line_error(result, "does not match")


def test_file_that_is_not_a_certificate(tmp_path: Path, dev_certs: DevCerts) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("hello\n")
    result = run_cli(*serve("--cert", str(junk), "--key", str(dev_certs.key)))
    assert_one_line_error(result, "no PEM certificate")


def test_expired_certificate_is_refused(tmp_path: Path) -> None:
    cert, key = pair_on_disk(tmp_path, "old", not_before_days=-10)
    result = run_cli(*serve("--cert", cert, "--key", key))
    assert_one_line_error(result, "expired", "renew")


def test_port_in_use(dev_certs: DevCerts) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            "127.0.0.1:0",
            "--cert",
            str(dev_certs.cert),
            "--key",
            str(dev_certs.key),
        )
    assert_one_line_error(result, f"127.0.0.1:{port}", "already in use")


def test_help_shows_defaults_and_environment_variables() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, env, default in (
        ("--listen", "TLS_SIDECAR_LISTEN", "0.0.0.0:8443"),
        ("--upstream", "TLS_SIDECAR_UPSTREAM", "http://127.0.0.1:8080"),
        ("--admin-listen", "TLS_SIDECAR_ADMIN_LISTEN", "0.0.0.0:9901"),
        ("--header-timeout", "TLS_SIDECAR_HEADER_TIMEOUT", "15s"),
        ("--max-header-bytes", "TLS_SIDECAR_MAX_HEADER_BYTES", "16384"),
    ):
        assert flag in text and env in text and default in text, flag


def test_environment_variables_configure_the_proxy(dev_certs: DevCerts) -> None:
    app = UpstreamApp().start()
    try:
        proxy = ProxyProcess(
            ["serve"],
            env={
                "TLS_SIDECAR_LISTEN": "127.0.0.1:0",
                "TLS_SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
                "TLS_SIDECAR_UPSTREAM": app.base,
                "TLS_SIDECAR_CERT": str(dev_certs.cert),
                "TLS_SIDECAR_KEY": str(dev_certs.key),
                "TLS_SIDECAR_ACCESS_LOG": "false",
            },
        ).start()
        try:
            assert proxy.admin_get("/readyz")[0] == 200
            ctx = ssl.create_default_context(cafile=str(dev_certs.ca))
            with (
                socket.create_connection(("127.0.0.1", proxy.port)) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as sock,
            ):
                sock.sendall(
                    b"GET /echo/env HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")
        finally:
            proxy.stop()
        assert proxy.access_records() == [], "--no-access-log via TLS_SIDECAR_ACCESS_LOG=false"
    finally:
        app.stop()


@pytest.mark.parametrize(
    ("flag", "variable", "value", "fragment"),
    [
        ("--upstream", "TLS_SIDECAR_UPSTREAM", "127.0.0.1", "'127.0.0.1' has no port"),
        ("--cert", "TLS_SIDECAR_CERT", "/nonexistent/tls.crt", "does not exist"),
        ("--workers", "TLS_SIDECAR_WORKERS", "many", "1-256 or auto"),
        ("--client-auth", "TLS_SIDECAR_CLIENT_AUTH", "sometimes", "is not one of"),
        ("--max-connections", "TLS_SIDECAR_MAX_CONNECTIONS", "0", "x>=1"),
    ],
)
def test_a_message_names_the_flag_or_the_variable_whichever_was_set(
    flag: str, variable: str, value: str, fragment: str
) -> None:
    """A value from the environment is named by its variable, one from the command line by its
    flag; never the other (click's own messages named both)."""
    by_flag = run_cli(*serve(flag, value))
    assert_one_line_error(by_flag, flag, fragment)
    assert variable not in by_flag.stderr
    by_variable = run_cli(*serve(), env={variable: value})
    assert_one_line_error(by_variable, variable, fragment)
    assert flag not in by_variable.stderr.replace(variable, "")


def test_check_names_the_variable_that_was_set() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TLS_SIDECAR_UPSTREAM="127.0.0.1:0"),
    )
    assert done.returncode == 2
    assert done.stdout.splitlines()[0] == (
        "fail  flags: TLS_SIDECAR_UPSTREAM: port 0 in '127.0.0.1:0' is no port an app listens "
        "on; give the app's port, e.g. http://127.0.0.1:8080"
    )


def test_a_bare_upstream_host_and_port_is_http() -> None:
    app = UpstreamApp().start()
    try:
        _, lines = run_check("--upstream", app.base.removeprefix("http://"))
    finally:
        app.stop()
    assert lines[0].startswith(f"ok    flags: upstream {app.base},"), lines


def test_without_certificate_a_self_signed_one_is_served_with_a_warning() -> None:
    app = UpstreamApp().start()
    proxy = ProxyProcess(serve("--upstream", app.base)).start()
    try:
        warning = next(json.loads(line) for line in proxy.stderr_lines if "NO CERTIFICATE" in line)
        assert warning["level"] == "warning"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", proxy.port)) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            cert = x509.load_der_x509_certificate(der)
            assert "self-signed" in cert.subject.rfc4514_string()
            assert {"DNS:localhost", "IP:127.0.0.1", "IP:::1"} <= set(certs.san_strings(cert))
        assert "BEGIN" not in proxy.stderr_text(), "no key material is logged"
    finally:
        proxy.stop()
        app.stop()


def test_demo_with_its_app_port_taken_says_how_to_move_it_under_make_run(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = ProxyProcess(
            [
                *("demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
                *("--certs-dir", str(tmp_path / "certs")),
            ],
            env={"TLS_SIDECAR_DEMO_APP_LISTEN": f"127.0.0.1:{port}"},
        ).start(expect_ready=False)
        assert demo.wait(60) == 2
    # the message names what was set: the variable, as make run users set it
    assert demo.stderr_lines[-1] == (
        f"tls-sidecar: error: TLS_SIDECAR_DEMO_APP_LISTEN 127.0.0.1:{port}: cannot listen "
        f"(address already in "
        f"use); pick another port, e.g. TLS_SIDECAR_DEMO_APP_LISTEN=127.0.0.1:{port + 1} make run"
    )


def start_demo(tmp_path: Path) -> tuple[ProxyProcess, str]:
    """`tls-sidecar demo` on ephemeral ports; its `try:` hint line once it serves."""
    demo = ProxyProcess(
        [
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--app-listen",
            "127.0.0.1:0",
            "--certs-dir",
            str(tmp_path / "certs"),
        ]
    ).start(expect_ready=False)
    line = wait_for(
        lambda: next((s for s in demo.stderr_lines if "try:" in s), None),
        30,
        "the demo's curl hint",
    )
    return demo, str(line)


@pytest.mark.needs("curl", install="apt-get install curl")
def test_demo_serves_the_echo_app_to_curl(tmp_path: Path) -> None:
    demo, line = start_demo(tmp_path)
    try:
        match = re.search(r"curl --cacert (\S+) (https://localhost:(\d+)/hello)", line)
        assert match, line
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                match.group(1),
                "--resolve",
                f"localhost:{match.group(3)}:127.0.0.1",
                match.group(2),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["path"] == "/hello"
        assert any(h.startswith("x-forwarded-proto: https") for h in doc["headers"])
        assert (tmp_path / "certs" / "ca.key").stat().st_mode & 0o077 == 0, "keys are written 0600"
        assert websocket_echo(int(match.group(3)), Path(match.group(1))) == "hi"
    finally:
        demo.stop()
    assert demo.wait() == 0


def test_allow_expired_starts_with_a_warning(tmp_path: Path) -> None:
    cert, key = pair_on_disk(tmp_path, "old", not_before_days=-10)
    app = UpstreamApp().start()
    proxy = ProxyProcess(
        serve(
            "--upstream",
            app.base,
            "--cert",
            cert,
            "--key",
            key,
            "--allow-expired",
        )
    ).start()
    try:
        assert any("expired" in line and '"warning"' in line for line in proxy.stderr_lines)
        assert proxy.admin_get("/readyz")[0] == 200
    finally:
        proxy.stop()
        app.stop()


def test_not_yet_valid_certificate_is_refused(tmp_path: Path) -> None:
    cert, key = pair_on_disk(tmp_path, "future", not_before_days=2, days=30)
    result = run_cli(*serve("--cert", cert, "--key", key))
    assert_one_line_error(result, "not valid before", "clock")


def test_client_auth_none_with_a_client_ca_is_refused(dev_certs: DevCerts) -> None:
    result = run_cli(
        *serve("--client-ca", str(dev_certs.ca), "--allow-all", "--client-auth", "none")
    )
    assert_one_line_error(result, "--client-auth none")


@pytest.mark.needs("openssl", install="apt-get install openssl")
def test_openssl_s_client_with_a_client_certificate(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert run_cli("certs", "init", "--out", str(out)).returncode == 0
    app = UpstreamApp().start()
    proxy = ProxyProcess(
        serve(
            "--upstream",
            app.base,
            "--cert",
            str(out / "server.crt"),
            "--key",
            str(out / "server.key"),
            "--client-ca",
            str(out / "ca.crt"),
            "--allow-cn",
            "tls-sidecar-dev-client",
        )
    ).start()
    try:
        request = b"GET /echo/openssl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        base = [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(out / "ca.crt"),
            "-verify_return_error",
            "-quiet",
        ]
        admitted = subprocess.run(
            [*base, "-cert", str(out / "client.crt"), "-key", str(out / "client.key")],
            input=request,
            capture_output=True,
            timeout=30,
        )
        assert b"HTTP/1.1 200" in admitted.stdout, admitted.stderr
        assert b"x-forwarded-client-cert" in admitted.stdout
        refused = subprocess.run(base, input=request, capture_output=True, timeout=30)
        assert b"HTTP/1.1" not in refused.stdout
        assert b"alert" in refused.stderr.lower() or refused.returncode != 0
        tls11 = subprocess.run([*base, "-tls1_1"], input=request, capture_output=True, timeout=30)
        assert b"HTTP/1.1" not in tls11.stdout and tls11.returncode != 0
    finally:
        proxy.stop()
        app.stop()


def websocket_echo(port: int, ca: Path) -> str:
    """One text message through the demo's WebSocket echo, over TLS via the proxy."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(WsRequest(host="localhost", target="/ws")))
        while True:
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    sock.sendall(ws.send(TextMessage(data="hi")))
                elif isinstance(event, TextMessage):
                    return str(event.data)


def test_serve_without_mutual_tls_never_loads_cryptography(dev_certs: DevCerts) -> None:
    """Certificates are checked in a helper process: 8 MiB less for the life of the proxy."""
    app = UpstreamApp().start()
    try:
        proxy = ProxyProcess(serve_args(app.base, dev_certs)).start()
        try:
            assert proxy.proc is not None
            maps = Path(f"/proc/{proxy.proc.pid}/maps").read_text()
            assert "cryptography" not in maps
            assert https(proxy, dev_certs.ca, path="/echo/no-crypto")[0] == 200
        finally:
            proxy.stop()
    finally:
        app.stop()


@pytest.mark.needs("chromium", install="apt-get install chromium")
def test_a_real_browser_loads_the_demo_over_http2(tmp_path: Path) -> None:
    """Headless Chromium, trusting only the demo certificate's key, gets the page over h2."""
    demo, line = start_demo(tmp_path)
    try:
        match = re.search(r"https://localhost:(\d+)/hello", line)
        assert match, line
        leaf = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.crt").read_bytes())
        spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
        result = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--ignore-certificate-errors-spki-list={pin}",
                "--host-resolver-rules=MAP localhost 127.0.0.1",
                "--dump-dom",
                f"https://localhost:{match.group(1)}/from-chromium",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert '"path": "/from-chromium"' in result.stdout, result.stdout + result.stderr[-2000:]
        line = wait_for(
            lambda: next((s for s in demo.stdout_lines if '"GET /from-chromium" 200' in s), None),
            10,
            "the browser's access-log line",
        )
        assert " h2 TLSv1.3 " in line  # the demo logs as text: the protocol, then TLS
    finally:
        demo.stop()
    assert demo.wait() == 0


def run_check(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout.splitlines()


def test_check_a_good_configuration_says_ok_line_by_line(dev_certs: DevCerts) -> None:
    app = UpstreamApp().start()
    try:
        code, lines = run_check(*serve_args(app.base, dev_certs)[1:])
    finally:
        app.stop()
    assert code == 0, lines
    assert [line.split(":", 1)[0] for line in lines] == [
        "ok    flags",
        "ok    certificate default",
        "ok    listen",
        "ok    admin-listen",
        "ok    upstream",
    ]
    assert "expires" in lines[1] and "days)" in lines[1]


def test_check_warns_on_a_certificate_about_to_expire_and_an_app_not_up(
    dev_certs: DevCerts, tmp_path: Path, refused_port: int
) -> None:
    soon = certs.issue(
        certs.create_ca("check CA"),
        ["localhost"],
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=815),
    )  # 825 days of validity: 10 left
    (tmp_path / "soon.crt").write_bytes(soon.cert_pem)
    certs.write_private(tmp_path / "soon.key", soon.key_pem)
    code, lines = run_check(
        "--cert",
        str(tmp_path / "soon.crt"),
        "--key",
        str(tmp_path / "soon.key"),
        "--upstream",
        f"http://127.0.0.1:{refused_port}",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    )
    assert code == 1, lines
    assert any(
        line.startswith("warn  certificate default") and "(10 days)" in line for line in lines
    )
    assert any(line.startswith("warn  upstream") for line in lines)


def test_check_fails_what_would_not_start(dev_certs: DevCerts) -> None:
    code, lines = run_check("--cert", str(dev_certs.cert), "--key", str(dev_certs.ca))
    assert code == 2
    assert any(line.startswith("fail  certificates: --key") for line in lines), lines
    code, lines = run_check("--listen", "nowhere")
    assert (code, lines[0][:11]) == (2, "fail  flags")


@pytest.fixture(scope="module")
def init_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `certs init` makes: ca, server and client certificates and keys."""
    out = tmp_path_factory.mktemp("init") / "certs"
    made = run_cli("certs", "init", "--certs-dir", str(out))
    assert made.returncode == 0, made.stderr
    return out


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("ca", ["--cert", "ca.crt is a CA certificate", "give the server certificate"]),
        ("client", ["--cert", "client.crt is a client certificate", "serverAuth"]),
    ],
)
def test_serve_and_check_refuse_a_ca_or_client_certificate_as_the_server_one(
    init_certs: Path, name: str, fragments: list[str]
) -> None:
    """Clients refuse either from a server; the proxy says so at start-up, not at each handshake."""
    pair = ("--cert", str(init_certs / f"{name}.crt"), "--key", str(init_certs / f"{name}.key"))
    assert_one_line_error(run_cli(*serve(*pair)), *fragments)
    code, lines = run_check(*pair, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    assert code == 2, lines
    failed = [line for line in lines if line.startswith("fail  certificates: ")]
    assert failed and all(f in failed[0] for f in fragments), lines


def test_serve_and_check_refuse_a_leaf_as_the_client_ca(init_certs: Path) -> None:
    """The client certificate given as --client-ca: no client certificate would ever verify."""
    mtls = (
        "--cert",
        str(init_certs / "server.crt"),
        "--key",
        str(init_certs / "server.key"),
        "--client-ca",
        str(init_certs / "client.crt"),
        "--allow-all",
    )
    fragments = ["--client-ca", "client.crt", "not a CA", "tls-sidecar-dev-client"]
    assert_one_line_error(run_cli(*serve(*mtls)), *fragments)
    code, lines = run_check(*mtls, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    assert code == 2, lines
    assert [line for line in lines if "client" in line.lower()] == [
        f"fail  client CA: --client-ca: {init_certs / 'client.crt'} holds a certificate that is "
        "not a CA (CN=tls-sidecar-dev-client), so no client certificate would verify; give the "
        "CA that signs the client certificates (its ca.crt)"
    ], lines
    assert any(line.startswith("ok    certificate default: CN=localhost") for line in lines)


@pytest.mark.needs("make", install="apt-get install make")
def test_make_run_installs_the_runtime_only_and_the_tests_add_dev(tmp_path: Path) -> None:
    # A fresh clone's plan (make -n): `run` needs neither the test tools nor the [dev] extra.
    shim = (
        "proxy/http2/_nghttp2_shim.c",
        "proxy/http2/_nghttp2_client.c",
        "proxy/http2/_nghttp2_build.py",
    )
    # the compiled core's list and its sources: a change to any of them reinstalls
    core = ("proxy/compiled.py", *(m.replace(".", "/") + ".py" for m in compiled.MODULES))
    locks = ("requirements.lock", "build-requirements.lock")
    for name in ("Makefile", "pyproject.toml", *locks, "setup.py", *shim, *core):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)

    def plan(target: str) -> str:
        out = subprocess.run(
            ["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    run = plan("run")
    # the build of the editable install takes the build lock's versions (mypy for mypyc)
    assert "-c .venv/constraints.txt --build-constraint .venv/constraints-build.txt -e ." in run
    assert "[dev]" not in run
    assert "tls-sidecar demo" in run
    test = plan("test")
    # the dev extra's requirements on top, without building the package a second time
    assert "-c .venv/constraints-dev.txt -r .venv/requirements-dev.txt" in test
    assert test.count(" -e .") == 1, test
    assert 'PYTHONWARNINGS="ignore:Editable installation"' in test
