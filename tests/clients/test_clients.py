"""Real Azure clients get managed-identity tokens through `azgate token-service`.

The chain in every test: client -> azgate token-service (IMDS protocol) -> azgate imds-emulator.
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

    header = "azgate-emulator-identity-header"  # azgate::emulator::DEFAULT_IDENTITY_HEADER
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
