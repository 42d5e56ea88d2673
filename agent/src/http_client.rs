//! The agent's HTTP clients (hub downloads, `bench-serve`). reqwest's rustls takes the process's
//! crypto provider, and a client built before one is installed panics: every client starts here,
//! which installs ring (the operator's TLS provider too) once.

/// A client builder, the TLS provider installed.
#[allow(clippy::disallowed_methods)] // the one place clients start
pub fn builder() -> reqwest::ClientBuilder {
    // Fails only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A client with reqwest's defaults.
pub fn client() -> reqwest::Client {
    builder()
        .build()
        .expect("a default HTTP client builds once its TLS provider is installed")
}
