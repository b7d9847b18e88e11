//! Certificates made at test time with rcgen, written under the names `deploy/dev-certs.sh` uses (so tests and the
//! docs' examples name the same files): a CA (`ca.pem`), a server certificate for localhost and 127.0.0.1
//! (`server.pem`, `server.key`), a client certificate (`client.pem`, `client.key`), and a client certificate from
//! another CA (`stranger.pem`, `stranger.key`), which a mutual-TLS server must refuse. Also the settings and
//! clients that use them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use palette_service_kit::ServeArgs;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A token the servers under test accept (at least 16 characters, as the services require).
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// The generated files, in a temporary folder removed on drop.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Writes `<name>.pem` and `<name>.key`: a leaf certificate for `names`, signed by `issuer`.
fn leaf(
    dir: &Path,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

impl Pki {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ours = ca("palette test CA");
        std::fs::write(dir.path().join("ca.pem"), ours.pem()).unwrap();
        let server_names = ["localhost", "127.0.0.1"];
        leaf(
            dir.path(),
            "server",
            &server_names,
            ExtendedKeyUsagePurpose::ServerAuth,
            &ours,
        );
        leaf(
            dir.path(),
            "client",
            &["palette-client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ours,
        );
        let theirs = ca("someone else's CA");
        leaf(
            dir.path(),
            "stranger",
            &["stranger"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &theirs,
        );
        Pki { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// TLS on with the server certificate; with `mutual`, clients must present one signed by the CA.
    pub fn serve_tls(&self, serve: &mut ServeArgs, mutual: bool) {
        serve.tls_cert = Some(self.path("server.pem"));
        serve.tls_key = Some(self.path("server.key"));
        serve.tls_client_ca = mutual.then(|| self.path("ca.pem"));
    }

    /// Trusts the CA, checks the name `localhost`; presents `identity` ("client", "stranger") if given.
    pub fn client_tls(&self, identity: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost");
        if let Some(name) = identity {
            tls = tls.identity(Identity::from_pem(
                self.read(&format!("{name}.pem")),
                self.read(&format!("{name}.key")),
            ));
        }
        tls
    }

    /// An https endpoint for `addr` with `client_tls(identity)`.
    pub fn endpoint(&self, addr: SocketAddr, identity: Option<&str>) -> Endpoint {
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(self.client_tls(identity))
            .unwrap()
    }

    /// A connected channel, or the connection error (a refused handshake shows here).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        identity: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        self.endpoint(addr, identity).connect().await
    }
}
