//! wss://: rustls (ring provider) with a certificate that is reloaded without a restart when its
//! PEM files change (polled) or on [`TlsReloader::reload`] (SIGHUP). A failed reload keeps the
//! certificate in use and is logged and counted.

use parking_lot::RwLock;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Certificate chain and private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks a certificate and key pair; the error is one line.
pub fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    let ck = CertifiedKey::new(certs, key);
    ck.keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", files.key.display(), files.cert.display()))?;
    Ok(Arc::new(ck))
}

#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The listener's TLS state: an acceptor whose certificate can be swapped.
pub struct TlsReloader {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    stamp: parking_lot::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl TlsReloader {
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, String> {
        let stamp = (mtime(&files.cert), mtime(&files.key));
        let resolver = Arc::new(Resolver(RwLock::new(load(&files)?)));
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            files,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            stamp: parking_lot::Mutex::new(stamp),
        }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads the files now. On error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let res = load(&self.files).map(|ck| *self.resolver.0.write() = ck);
        let result = if res.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::TLS_RELOADS, "result" => result).increment(1);
        match &res {
            Ok(()) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
            Err(e) => tracing::error!(error = %e, "TLS reload failed: keeping the current certificate"),
        }
        res
    }

    /// Reloads when either file's modification time changed since the last successful load.
    /// A failed load is retried on the next look (the files may have been caught mid-write).
    pub fn reload_if_changed(&self) {
        let now = (mtime(&self.files.cert), mtime(&self.files.key));
        if *self.stamp.lock() != now && self.reload().is_ok() {
            *self.stamp.lock() = now;
        }
    }

    /// Polls the files every `every` until `stop`.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.reload_if_changed(),
            }
        }
    }
}
