//! Where the token endpoints live and which api-versions they speak.

/// The IMDS token path (the filter's call-out uses the same constant).
pub use azgate_filter::imds::TOKEN_PATH as IMDS_TOKEN_PATH;

/// The IMDS api-version azure-identity and MSAL send; it supports all three identity selectors.
pub use azgate_filter::imds::API_VERSION as IMDS_API_VERSION;

/// The IMDS identity-information path (`{"tenantId": …}`).
pub const IMDS_INFO_PATH: &str = "/metadata/identity/info";

/// App Service's (and Functions') identity endpoint path, as `IDENTITY_ENDPOINT` names it.
pub const APP_SERVICE_TOKEN_PATH: &str = "/msi/token";

/// The App Service protocol version that takes `X-IDENTITY-HEADER` and the `mi_res_id` selector.
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";
