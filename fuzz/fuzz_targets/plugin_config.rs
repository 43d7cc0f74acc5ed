//! The plugin configuration parser on arbitrary bytes. Checks: no panic; an accepted
//! configuration is within the documented ranges; an error names a field.
#![no_main]

use azgate_filter::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Config::parse(data) {
        Ok(config) => {
            assert!((1..=600_000).contains(&config.token_timeout_ms));
            assert!((0..=3_600).contains(&config.token_expiry_margin_s));
            assert!((256..=65_536).contains(&config.max_token_bytes));
            assert!((0..=600).contains(&config.clock_skew_s));
            assert!((1..=1_000).contains(&config.token_wait_poll_ms));
            assert!(config.verified_token_cache_size <= 1_000_000);
            assert!(!config.token_cluster.trim().is_empty());
            assert!(!config.token_authority.trim().is_empty());
        }
        Err(error) => {
            assert!(!error.field.is_empty(), "an error without a field: {error}");
            let _ = error.to_string();
        }
    }
});
