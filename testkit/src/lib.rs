//! # driftline-testkit
//!
//! What the integration tests of the agent and the collector share: a real
//! Mosquitto broker on a free loopback port ([`Mosquitto`]), waiting for a
//! condition or a port ([`wait_for`], [`wait_for_port`]), and certificates
//! for TLS tests ([`make_certificates`]).
//!
//! Mosquitto is required: a test that starts one fails, never skips, when
//! it is missing (`.ci/run` installs it).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driftline_core::broker::BrokerUrl;

/// A loopback port nobody listens on (yet).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Polls `ok` every 50 ms until it holds; panics after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Waits up to 10 s for something to listen on loopback `port`.
pub fn wait_for_port(port: u16, what: &str) {
    wait_for(
        &format!("{what} to listen on port {port}"),
        Duration::from_secs(10),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
}

/// A Mosquitto broker of the test's own, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl Mosquitto {
    /// Anonymous, without persistence, on a free port.
    pub fn start() -> Self {
        Mosquitto::with_config(tempfile::tempdir().expect("tempdir"), "")
    }

    /// [`Mosquitto::start`] with `extra` configuration lines (a later line
    /// wins over the defaults); its files live in `dir`, which the broker
    /// keeps until dropped.
    pub fn with_config(dir: tempfile::TempDir, extra: &str) -> Self {
        let port = free_port();
        let mut broker =
            Mosquitto::on_port(dir.path(), port, &format!("persistence false\n{extra}"));
        broker._dir = Some(dir);
        broker
    }

    /// Anonymous on a given `port` (a test that restarts the broker needs
    /// the same one), with `extra` configuration lines; the configuration
    /// file is written to `dir`.
    pub fn on_port(dir: &Path, port: u16, extra: &str) -> Self {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"),
        )
        .expect("write mosquitto.conf");
        Mosquitto::from_conf(&conf, port)
    }

    /// Sessions and queued messages persist in `dir` across restarts
    /// ([`Mosquitto::stop`], then this again).
    pub fn persistent(dir: &Path, port: u16) -> Self {
        let persistence = format!(
            "persistence true\npersistence_location {}/\n",
            dir.display()
        );
        Mosquitto::on_port(dir, port, &persistence)
    }

    /// A complete configuration file whose listener is `port`.
    pub fn from_conf(conf: &Path, port: u16) -> Self {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install mosquitto); .ci/run installs it");
        wait_for_port(port, "mosquitto");
        Mosquitto {
            child,
            port,
            _dir: None,
        }
    }

    /// The broker's process id (to freeze it with SIGSTOP, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> BrokerUrl {
        BrokerUrl {
            host: "127.0.0.1".into(),
            port: self.port,
            tls: false,
        }
    }

    /// Publishes the file's contents with `mosquitto_pub` (QoS 1).
    pub fn publish(&self, topic: &str, payload_file: &Path) {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-q", "1", "-t", topic, "-f"])
            .arg(payload_file)
            .status()
            .expect("mosquitto_pub must be installed (apt-get install mosquitto-clients)");
        assert!(status.success(), "mosquitto_pub failed for {topic}");
    }

    /// Stops the broker with SIGTERM, so that it saves its sessions.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a test CA (`ca.pem`), a server certificate for `localhost` and
/// 127.0.0.1 (`server.pem`, `server.key`) and a client certificate
/// (`client.pem`, `client.key`) into `dir`, readable by a Mosquitto that
/// drops root for its own user.
pub fn make_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    // Distinct subjects: OpenSSL takes a leaf whose subject equals its
    // issuer for a self-signed certificate.
    let named = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.distinguished_name = named("Driftline test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf = |names: Vec<String>, name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name = named(name);
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        // These keys exist only for the test.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    };
    leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
    leaf(vec!["dev-1".into()], "client");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
