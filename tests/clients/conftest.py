"""Fixtures for the real-client tests: the azgate IMDS emulator, the azgate token service in
front of it, and a fake ARM over TLS for `az login`. Everything listens on 127.0.0.1 with ports
the OS picks; the processes are the real `azgate` binary."""

import base64
import datetime
import http.server
import ipaddress
import json
import os
import pathlib
import ssl
import subprocess
import tempfile
import threading
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"  # azgate_emulator::TENANT_ID
SUBSCRIPTION_ID = "00000000-0000-0000-0000-00000000a2a7"

# Variables that would make Azure clients (or azgate's source detection) look anywhere but
# where a test points them.
AZURE_ENV = [
    "AZURE_POD_IDENTITY_AUTHORITY_HOST", "IDENTITY_ENDPOINT", "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET",
    "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_CONFIG_DIR",
    "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE",
]


def clean_env(**extra):
    """The process environment without Azure settings, with every non-loopback request sent to a
    dead proxy, so nothing in these tests can reach (or depend on) the internet."""
    env = {k: v for k, v in os.environ.items() if k not in AZURE_ENV and not k.lower().endswith("_proxy")}
    env.update(
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


def jwt_claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def http_json(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


class AzgateProcess:
    """An `azgate` subcommand (or another azgate binary) that prints `listening on ADDR` once it
    serves."""

    def __init__(self, args, env, binary=None):
        binary = binary or os.environ.get("AZGATE_BIN", str(REPO / "target" / "debug" / "azgate"))
        if not os.access(binary, os.X_OK):
            pytest.fail(f"binary not found at {binary}; run tests/clients/run.sh")
        # stderr goes to a file: an undrained pipe would block a chatty process.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            self.process.wait()
            self.log.seek(0)
            pytest.fail(f"azgate {args[0]} did not start: {line!r} {self.log.read()}")
        self.addr = line.removeprefix("listening on ").strip()
        self.base_url = f"http://{self.addr}"

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Emulator(AzgateProcess):
    def stats(self):
        return http_json(f"{self.base_url}/emulator/stats")

    def requests(self):
        return http_json(f"{self.base_url}/emulator/requests")

    def set_fault(self, **fault):
        http_json(f"{self.base_url}/emulator/fault", data=json.dumps(fault).encode())


class TokenService(AzgateProcess):
    def metrics(self):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                values[name] = int(value)
        return values


@pytest.fixture
def emulator():
    # The emulator is a test double: its own binary, not part of `azgate`.
    binary = os.environ.get("AZGATE_EMULATOR_BIN", str(REPO / "target" / "debug" / "azgate-imds-emulator"))
    process = Emulator(["--listen", "127.0.0.1:0"], clean_env(), binary)
    yield process
    process.stop()


@pytest.fixture
def token_service(emulator):
    process = TokenService(
        ["token-service", "--listen", "127.0.0.1:0", "--source", "imds", "--imds-endpoint", emulator.base_url],
        clean_env(AZGATE_LOG="info"),
    )
    yield process
    process.stop()


class FakeArm:
    """Just enough Azure Resource Manager, over TLS, for `az login`: the subscription list.
    Records the bearer tokens it was shown."""

    def __init__(self, directory):
        self.cert_file = directory / "arm-cert.pem"
        key_file = directory / "arm-key.pem"
        write_self_signed_cert(self.cert_file, key_file)
        self.seen = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                fake.seen.append((self.path, self.headers.get("Authorization", "")))
                if self.path.startswith("/subscriptions?"):
                    body = {"value": [{
                        "id": f"/subscriptions/{SUBSCRIPTION_ID}",
                        "subscriptionId": SUBSCRIPTION_ID,
                        "tenantId": TENANT_ID,
                        "displayName": "azgate-emulated",
                        "state": "Enabled",
                        "subscriptionPolicies": {},
                        "authorizationSource": "RoleBased",
                    }]}
                    self.reply(200, body)
                else:
                    self.reply(404, {"error": {"code": "NotFound", "message": self.path}})

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def write_self_signed_cert(cert_file, key_file):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture
def fake_arm(tmp_path):
    arm = FakeArm(tmp_path)
    yield arm
    arm.stop()



APP_SERVICE_SECRET = "azgate-clients-test-identity-header"


@pytest.fixture
def app_service_token_service(emulator, tmp_path):
    """`azgate token-service` getting tokens from the emulator over IMDS and serving them over
    both protocols: IMDS at `base_url`, App Service at `identity_endpoint` to callers sending
    `APP_SERVICE_SECRET` as X-IDENTITY-HEADER (read from a file)."""
    secret_file = tmp_path / "identity-header"
    secret_file.write_text(APP_SERVICE_SECRET + "\n")
    process = TokenService(
        ["token-service", "--listen", "127.0.0.1:0", "--source", "imds", "--imds-endpoint", emulator.base_url,
         "--app-service-header-file", str(secret_file)],
        clean_env(AZGATE_LOG="info"),
    )
    process.identity_endpoint = f"{process.base_url}/msi/token"
    yield process
    process.stop()


def use_env(monkeypatch, env):
    """Makes this process's environment exactly `env` for the test."""
    for name in list(os.environ):
        if name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


NODE_DIR = REPO / ".tools" / "node"


@pytest.fixture(scope="session")
def node_identity():
    """Runs tests/clients/identity.mjs (@azure/identity's ManagedIdentityCredential) with an
    environment; returns its JSON answer. Installs the pinned package on first use."""
    setup = subprocess.run(["bash", str(REPO / "tests" / "clients" / "node.sh")], capture_output=True, text=True)
    if setup.returncode != 0:
        pytest.fail(f"tests/clients/node.sh failed:\n{setup.stderr}")

    def run(env, **options):
        env = dict(env, NODE_PATH=str(NODE_DIR / "node_modules"), AZGATE_IDENTITY_OPTIONS=json.dumps(options))
        result = subprocess.run(
            ["node", str(REPO / "tests" / "clients" / "identity.mjs")],
            env=env, capture_output=True, text=True, timeout=60, cwd=str(NODE_DIR),
        )
        assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run
