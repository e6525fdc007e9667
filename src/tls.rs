//! TLS on the gateway's own port (both doors), and mutual TLS: the certificate and key
//! files, read again on SIGHUP without dropping a connection, and, when a client CA is
//! configured, client certificates required and checked against it. A verified client
//! certificate names its holder by its first URI SAN (a SPIFFE id) or else its first DNS
//! SAN; a call that brings no bearer token is then that subject's (`core::identity`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};

/// `[server.tls]`: off unless `cert_file` and `key_file` are set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), leaf first.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates; set, every client must
    /// present one it signed (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// The server's TLS settings, swapped whole on reload.
pub struct TlsAcceptor {
    config: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsAcceptor {
    pub fn new(config: &TlsConfig) -> anyhow::Result<Self> {
        let server = server_config(config)?;
        Ok(TlsAcceptor {
            config: config.clone(),
            current: RwLock::new(Arc::new(server)),
        })
    }

    /// Reads the files again; connections already open keep the settings they began with.
    pub fn reload(&self) -> anyhow::Result<()> {
        let server = server_config(&self.config)?;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(server);
        }
        Ok(())
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn server_config(config: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
        anyhow::bail!("server.tls needs both cert_file and key_file");
    };
    let chain = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| anyhow::anyhow!("server.tls.key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca_file)? {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!("server.tls.client_ca_file {}: {e}", ca_file.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| anyhow::anyhow!("server.tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("server.tls: the certificate and key do not fit: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The identity of a verified client certificate: its first URI SAN, else its first DNS
/// SAN; `None` for a certificate that names neither.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    parsed
        .valid_uri_names()
        .next()
        .or_else(|| parsed.valid_dns_names().next())
        .map(str::to_owned)
}
