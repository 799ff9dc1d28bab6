//! A throw-away certificate authority per test: a CA, a server certificate for `localhost`, and
//! a client certificate, written as PEM files into a fresh directory removed on drop.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    /// A CA (`ca.crt`), a server certificate for `localhost` only (`server.crt`/`server.key`)
    /// and a client certificate (`client.crt`/`client.key`), all from one new CA; plus
    /// `other-ca.crt`, a CA that signed none of them.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "rtk-pki-{name}-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_params, ca_key) = ca("rtk test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        write(&dir, "ca.crt", &ca_cert.pem());
        let issuer = Issuer::new(ca_params, ca_key);
        for (file, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, file);
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &issuer).unwrap();
            write(&dir, &format!("{file}.crt"), &cert.pem());
            write(&dir, &format!("{file}.key"), &key.serialize_pem());
        }
        let (other_params, other_key) = ca("another CA");
        write(
            &dir,
            "other-ca.crt",
            &other_params.self_signed(&other_key).unwrap().pem(),
        );
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

fn ca(name: &str) -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params, key)
}

fn write(dir: &Path, file: &str, pem: &str) {
    std::fs::write(dir.join(file), pem).unwrap();
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
