"""Real Azure clients get managed-identity tokens through `azgate token-service`.

The chain in every test: client -> azgate token-service (IMDS protocol, or App Service protocol
with `--app-service-header-file`) -> azgate-imds-emulator.
The emulator issues JWT-shaped tokens that name the identity they were issued for
(`xms_mirid`), so a test can tell a token that made the whole trip from anything else, and its
request counter shows how many calls reached "IMDS"."""

import json
import subprocess
import time

import pytest

from conftest import REPO, SUBSCRIPTION_ID, TENANT_ID, clean_env, jwt_claims

MIRID = (
    "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-clients"
    "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/azgate-client-test"
)


@pytest.fixture
def client_env(monkeypatch, token_service):
    """This process's environment as an IMDS client of the token service sees it."""
    env = clean_env(AZURE_POD_IDENTITY_AUTHORITY_HOST=token_service.base_url)
    for name in list(__import__("os").environ):
        if name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_managed_identity_credential_gets_a_token_through_the_token_service(emulator, token_service, client_env):
    from azure.identity import ManagedIdentityCredential

    # azure-identity names the ARM-id selector "resource_id" and sends it as msi_res_id.
    credential = ManagedIdentityCredential(identity_config={"resource_id": MIRID})
    token = credential.get_token("https://vault.azure.net/.default")

    claims = jwt_claims(token.token)
    assert claims["aud"] == "https://vault.azure.net"
    assert claims["xms_mirid"] == MIRID
    assert claims["tid"] == TENANT_ID
    assert token.expires_on > time.time() + 23 * 3600, "a 24 h emulator token keeps its expiry"

    # It came from the emulator, through the token service, on the IMDS protocol.
    assert emulator.stats()["token_requests"] == 1
    [upstream] = emulator.requests()
    assert upstream["path_and_query"].startswith("/metadata/identity/oauth2/token?")
    assert "msi_res_id=" in upstream["path_and_query"]
    metrics = token_service.metrics()
    assert metrics["azgate_token_cache_misses_total"] == 1

    # A second credential (its own MSAL cache is empty) is answered from azgate's cache.
    again = ManagedIdentityCredential(identity_config={"resource_id": MIRID}).get_token(
        "https://vault.azure.net/.default"
    )
    assert again.token == token.token
    assert emulator.stats()["token_requests"] == 1
    assert token_service.metrics()["azgate_token_cache_hits_total"] == 1


def test_managed_identity_credential_sees_a_design_time_error_as_unavailable(emulator, token_service, client_env):
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import ManagedIdentityCredential

    emulator.set_fault(fault="status", status=400)
    with pytest.raises(ClientAuthenticationError):
        ManagedIdentityCredential(client_id="11111111-2222-3333-4444-555555555555").get_token(
            "https://storage.azure.com/.default"
        )
    # azgate did not retry the 400.
    assert emulator.stats()["token_requests"] == 1


def test_az_cli_logs_in_and_gets_tokens_through_the_token_service(emulator, token_service, fake_arm, tmp_path):
    env = clean_env(
        AZURE_CONFIG_DIR=str(tmp_path / "azure-config"),
        AZURE_CORE_COLLECT_TELEMETRY="false",
        AZURE_CORE_NO_COLOR="true",
        AZURE_POD_IDENTITY_AUTHORITY_HOST=token_service.base_url,
        REQUESTS_CA_BUNDLE=str(fake_arm.cert_file),
    )
    az_binary = REPO / ".venv" / "bin" / "az"

    def az(*args):
        result = subprocess.run(
            [str(az_binary), *args, "--output", "json"], env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, f"az {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return json.loads(result.stdout) if result.stdout.strip() else None

    # A cloud whose ARM is the loopback fake, so `az login` can list subscriptions offline.
    az(
        "cloud", "register", "--name", "AzgateEmulated",
        "--endpoint-resource-manager", fake_arm.url,
        "--endpoint-active-directory", "https://login.microsoftonline.com",
        "--endpoint-active-directory-resource-id", "https://management.core.windows.net/",
        "--skip-endpoint-discovery",
    )
    az("cloud", "set", "--name", "AzgateEmulated")

    subscriptions = az("login", "--identity", "--resource-id", MIRID)
    assert [s["id"] for s in subscriptions] == [SUBSCRIPTION_ID]
    assert subscriptions[0]["tenantId"] == TENANT_ID
    # ARM was shown the token azgate served for this identity.
    bearer = [auth for path, auth in fake_arm.seen if path.startswith("/subscriptions?")]
    assert bearer, f"az never listed subscriptions: {fake_arm.seen}"
    arm_claims = jwt_claims(bearer[-1].removeprefix("Bearer "))
    assert arm_claims["xms_mirid"] == MIRID
    assert arm_claims["aud"] == "https://management.core.windows.net/"

    management = az("account", "get-access-token")
    claims = jwt_claims(management["accessToken"])
    assert claims["xms_mirid"] == MIRID
    assert claims["aud"] == "https://management.core.windows.net/"
    assert management["subscription"] == SUBSCRIPTION_ID
    assert management["expires_on"] > time.time() + 23 * 3600

    vault = az("account", "get-access-token", "--resource", "https://vault.azure.net")
    vault_claims = jwt_claims(vault["accessToken"])
    assert vault_claims["aud"] == "https://vault.azure.net"
    assert vault_claims["xms_mirid"] == MIRID

    # az fetches a managed-identity token on every command; azgate fetched once per resource.
    upstream_resources = sorted(
        r["path_and_query"].split("resource=")[1].split("&")[0] for r in emulator.requests()
    )
    assert upstream_resources == ["https%3A%2F%2Fmanagement.core.windows.net%2F", "https%3A%2F%2Fvault.azure.net"]
    metrics = token_service.metrics()
    assert metrics["azgate_token_cache_hits_total"] >= 1
    assert metrics["azgate_token_upstream_requests_total"] == 2


def test_token_service_detects_an_app_service_source_from_the_environment(emulator, monkeypatch):
    """`--source auto` with IDENTITY_ENDPOINT + IDENTITY_HEADER set picks the App Service
    protocol; IMDS clients of the token service do not notice the difference."""
    from conftest import TokenService
    from azure.identity import ManagedIdentityCredential

    header = "azgate-emulator-identity-header"  # azgate_emulator::DEFAULT_IDENTITY_HEADER
    service = TokenService(
        ["token-service", "--listen", "127.0.0.1:0"],
        clean_env(IDENTITY_ENDPOINT=f"{emulator.base_url}/msi/token", IDENTITY_HEADER=header),
    )
    try:
        for name, value in clean_env(AZURE_POD_IDENTITY_AUTHORITY_HOST=service.base_url).items():
            monkeypatch.setenv(name, value)
        for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET"):
            monkeypatch.delenv(name, raising=False)
        token = ManagedIdentityCredential(client_id="0f0e0d0c-0b0a-0908-0706-050403020100").get_token(
            "https://storage.azure.com/.default"
        )
        claims = jwt_claims(token.token)
        assert claims["aud"] == "https://storage.azure.com"
        assert claims["appid"] == "0f0e0d0c-0b0a-0908-0706-050403020100"
        [upstream] = emulator.requests()
        assert upstream["path_and_query"].startswith("/msi/token?api-version=2019-08-01&")
        assert dict(upstream["headers"])["x-identity-header"] == header
    finally:
        service.stop()


def test_azure_identity_accepts_the_emulators_app_service_endpoint(emulator, monkeypatch):
    """The emulator's App Service shape (no expires_in, epoch-string expires_on) is what
    azure-identity's App Service path parses."""
    from azure.identity import ManagedIdentityCredential

    for name, value in clean_env(
        IDENTITY_ENDPOINT=f"{emulator.base_url}/msi/token", IDENTITY_HEADER="azgate-emulator-identity-header"
    ).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", raising=False)
    token = ManagedIdentityCredential(identity_config={"resource_id": MIRID}).get_token(
        "https://management.azure.com/.default"
    )
    assert jwt_claims(token.token)["xms_mirid"] == MIRID
    assert token.expires_on > time.time() + 23 * 3600
    assert emulator.stats()["token_requests"] == 1


def test_token_service_exchanges_a_workload_identity_token(emulator, monkeypatch, tmp_path):
    """`--source auto` with the AKS workload-identity variables exchanges the projected
    service-account token at the (emulated) Entra authority, per client id."""
    from conftest import TokenService
    from azure.identity import ManagedIdentityCredential

    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVtbzphcHAifQ.c2ln")
    service = TokenService(
        ["token-service", "--listen", "127.0.0.1:0"],
        clean_env(
            AZURE_TENANT_ID=TENANT_ID,
            AZURE_CLIENT_ID="aaaaaaaa-0000-0000-0000-000000000001",
            AZURE_FEDERATED_TOKEN_FILE=str(token_file),
            AZURE_AUTHORITY_HOST=emulator.base_url,
        ),
    )
    try:
        for name, value in clean_env(AZURE_POD_IDENTITY_AUTHORITY_HOST=service.base_url).items():
            monkeypatch.setenv(name, value)
        for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        default = ManagedIdentityCredential().get_token("https://vault.azure.net/.default")
        other = ManagedIdentityCredential(client_id="bbbbbbbb-0000-0000-0000-000000000002").get_token(
            "https://vault.azure.net/.default"
        )
        assert jwt_claims(default.token)["appid"] == "aaaaaaaa-0000-0000-0000-000000000001"
        assert jwt_claims(other.token)["appid"] == "bbbbbbbb-0000-0000-0000-000000000002"
        assert jwt_claims(other.token)["aud"] == "https://vault.azure.net"
        exchanges = emulator.requests()
        assert [r["path_and_query"] for r in exchanges] == [f"/{TENANT_ID}/oauth2/v2.0/token"] * 2
        assert all(r["method"] == "POST" for r in exchanges)
    finally:
        service.stop()


# --- The App Service protocol of the token service, and CAE refreshes ---------------------------

def app_service_env(service, secret=None):
    from conftest import APP_SERVICE_SECRET

    return clean_env(IDENTITY_ENDPOINT=service.identity_endpoint, IDENTITY_HEADER=secret or APP_SERVICE_SECRET)


def test_msal_python_gets_a_token_over_the_app_service_protocol(emulator, app_service_token_service, monkeypatch):
    """MSAL Python's ManagedIdentityClient (what az >= 2.73 and azure-identity use) with
    IDENTITY_ENDPOINT + IDENTITY_HEADER pointing at the token service."""
    import msal
    import requests
    from conftest import use_env

    use_env(monkeypatch, app_service_env(app_service_token_service))
    client = msal.ManagedIdentityClient(msal.UserAssignedManagedIdentity(resource_id=MIRID), http_client=requests.Session())
    result = client.acquire_token_for_client(resource="https://vault.azure.net")
    assert "access_token" in result, result
    claims = jwt_claims(result["access_token"])
    assert claims["xms_mirid"] == MIRID
    assert result["expires_in"] > 23 * 3600

    # MSAL Python names an object id `object_id`; the token service reads it as principal_id.
    by_object = msal.ManagedIdentityClient(
        msal.UserAssignedManagedIdentity(object_id="0a1b2c3d-0000-0000-0000-000000000003"), http_client=requests.Session()
    ).acquire_token_for_client(resource="https://storage.azure.com")
    assert jwt_claims(by_object["access_token"])["oid"] == "0a1b2c3d-0000-0000-0000-000000000003"

    # On the wire to azgate: App Service 2019-08-01 with the header; from azgate to "IMDS": IMDS.
    upstream = emulator.requests()
    assert [r["path_and_query"].split("?")[0] for r in upstream] == ["/metadata/identity/oauth2/token"] * 2
    assert "object_id=0a1b2c3d" in upstream[1]["path_and_query"]

    # A wrong header is refused with App Service's 401 shape; MSAL reports an error.
    use_env(monkeypatch, app_service_env(app_service_token_service, secret="not-the-secret"))
    refused = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=requests.Session()).acquire_token_for_client(
        resource="https://vault.azure.net"
    )
    assert "access_token" not in refused and "error" in refused, refused
    assert len(emulator.requests()) == 2


def test_azure_identity_gets_a_token_over_the_app_service_protocol(emulator, app_service_token_service, monkeypatch):
    from azure.identity import ManagedIdentityCredential
    from conftest import use_env

    use_env(monkeypatch, app_service_env(app_service_token_service))
    token = ManagedIdentityCredential(client_id="0f0e0d0c-0b0a-0908-0706-050403020100").get_token(
        "https://management.azure.com/.default"
    )
    claims = jwt_claims(token.token)
    assert claims["appid"] == "0f0e0d0c-0b0a-0908-0706-050403020100"
    assert token.expires_on > time.time() + 23 * 3600
    # The same identity over IMDS is the same cached token.
    use_env(monkeypatch, clean_env(AZURE_POD_IDENTITY_AUTHORITY_HOST=app_service_token_service.base_url))
    again = ManagedIdentityCredential(client_id="0f0e0d0c-0b0a-0908-0706-050403020100").get_token(
        "https://management.azure.com/.default"
    )
    assert again.token == token.token
    assert emulator.stats()["token_requests"] == 1


def test_node_azure_identity_gets_tokens_over_both_protocols(emulator, app_service_token_service, node_identity):
    """@azure/identity (JavaScript; @azure/msal-node underneath) ManagedIdentityCredential:
    App Service via IDENTITY_ENDPOINT/IDENTITY_HEADER, IMDS via AZURE_POD_IDENTITY_AUTHORITY_HOST."""
    service = app_service_token_service
    via_app_service = node_identity(app_service_env(service), scope="https://vault.azure.net/.default", resourceId=MIRID)
    assert jwt_claims(via_app_service["token"])["xms_mirid"] == MIRID
    assert via_app_service["expiresOnTimestamp"] > (time.time() + 23 * 3600) * 1000

    via_imds = node_identity(
        clean_env(AZURE_POD_IDENTITY_AUTHORITY_HOST=service.base_url),
        scope="https://vault.azure.net/.default", resourceId=MIRID,
    )
    assert via_imds["token"] == via_app_service["token"], "one cache behind both protocols"

    by_client = node_identity(
        app_service_env(service), scope="https://storage.azure.com/.default", clientId="11111111-2222-3333-4444-555555555555"
    )
    assert jwt_claims(by_client["token"])["appid"] == "11111111-2222-3333-4444-555555555555"
    upstream = [r["path_and_query"] for r in emulator.requests()]
    assert len(upstream) == 2 and all(p.startswith("/metadata/identity/oauth2/token?") for p in upstream), upstream


def raw_token(url, headers):
    """(status, JSON body) of one GET, errors included."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_cae_refresh_replaces_the_named_token_on_both_protocols(emulator, app_service_token_service):
    """token_sha256_to_refresh (what MSAL sends after an insufficient_claims challenge): the
    current token's hash gets a new token; any other hash gets the cached one."""
    import hashlib
    import urllib.parse
    from conftest import APP_SERVICE_SECRET

    service = app_service_token_service
    resource = urllib.parse.quote("https://management.azure.com/", safe="")
    imds = f"{service.base_url}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
    app = f"{service.identity_endpoint}?api-version=2019-08-01&resource={resource}"
    imds_headers = {"Metadata": "true"}
    app_headers = {"X-IDENTITY-HEADER": APP_SERVICE_SECRET}

    def sha256(token):
        return hashlib.sha256(token.encode()).hexdigest()

    status, first = raw_token(imds, imds_headers)
    assert status == 200
    first = first["access_token"]
    status, body = raw_token(f"{imds}&token_sha256_to_refresh={sha256('some other token')}", imds_headers)
    assert (status, body["access_token"]) == (200, first), "a wrong hash is answered from the cache"
    assert emulator.stats()["token_requests"] == 1

    status, body = raw_token(f"{imds}&token_sha256_to_refresh={sha256(first)}", imds_headers)
    second = body["access_token"]
    assert status == 200 and second != first
    assert emulator.stats()["token_requests"] == 2

    # The stale hash again, on the App Service protocol: the new token, from the cache.
    status, body = raw_token(f"{app}&token_sha256_to_refresh={sha256(first)}&xms_cc=cp1", app_headers)
    assert (status, body["access_token"]) == (200, second)
    assert isinstance(body["expires_on"], int)
    # The current one on the App Service protocol refreshes it too.
    status, body = raw_token(f"{app}&token_sha256_to_refresh={sha256(second)}", app_headers)
    assert status == 200 and body["access_token"] not in (first, second)
    assert emulator.stats()["token_requests"] == 3
    assert service.metrics()["azgate_token_cae_refreshes_total"] == 2

    # Malformed hashes are refused in each protocol's error shape.
    status, body = raw_token(f"{imds}&token_sha256_to_refresh=ABC", imds_headers)
    assert (status, body["error"]) == (400, "invalid_request")
    status, body = raw_token(f"{app}&token_sha256_to_refresh={sha256(second).upper()}", app_headers)
    assert status == 400 and body["statusCode"] == 400 and body["correlationId"]
    assert emulator.stats()["token_requests"] == 3


def test_the_app_service_protocol_is_off_without_a_secret(token_service):
    status, body = raw_token(f"{token_service.base_url}/msi/token?api-version=2019-08-01&resource=r", {"X-IDENTITY-HEADER": "x"})
    assert status == 404 and "--app-service-header-file" in body["message"]
