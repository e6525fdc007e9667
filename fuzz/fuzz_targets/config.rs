//! Arbitrary TOML text and `STEP3GW_*` environment pairs through the real config layering
//! (defaults → TOML → environment).
//!
//! Input: TOML text, a NUL byte, then `KEY=VALUE` lines (each key gets the `STEP3GW_`
//! prefix). Properties: an error or a config, never a panic; `validate()` and
//! `pool_settings()` never panic on a loaded config; a loaded config re-extracts from its
//! own serialisation unchanged.
#![no_main]

use figment::Figment;
use figment::providers::Serialized;
use libfuzzer_sys::fuzz_target;
use step3_gateway::config::{ENV_PREFIX, GatewayConfig};

fuzz_target!(|input: &[u8]| {
    let (toml, env) = match input.iter().position(|&b| b == 0) {
        Some(nul) => (&input[..nul], &input[nul + 1..]),
        None => (input, &[][..]),
    };
    let toml = String::from_utf8_lossy(toml);
    let env = String::from_utf8_lossy(env);
    let mut set = Vec::new();
    for line in env.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.is_empty() || key.contains('\0') || value.contains('\0') {
            continue;
        }
        let name = format!("{ENV_PREFIX}{key}");
        // SAFETY: a libFuzzer target runs on one thread; nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var(&name, value) };
        set.push(name);
    }

    let loaded = GatewayConfig::load_from_toml_str(&toml);

    for name in set {
        // SAFETY: as above.
        unsafe { std::env::remove_var(name) };
    }
    let Ok(config) = loaded else {
        return;
    };
    let _ = config.validate();
    let _ = config.upstream.pool_settings();
    let _ = config.shutdown_grace();
    let again: GatewayConfig = Figment::from(Serialized::defaults(&config))
        .extract()
        .expect("a loaded config re-extracts");
    assert_eq!(again, config);
});
