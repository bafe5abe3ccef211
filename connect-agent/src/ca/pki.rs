//! Small PKI encodings the CA needs and the libraries do not give us: colon-hex
//! fingerprints and key ids (Consul's API format), random serials, PEM, and the
//! PKCS#8 ⇄ SEC1 conversion for EC keys (ring speaks PKCS#8; Consul's API and its
//! users speak `EC PRIVATE KEY`).
//!
//! Pure functions over bytes; no I/O, no state.

use rand::RngCore;
use rustls::pki_types::CertificateDer;
use x509_parser::der_parser::{
    ber::{BerObject, BerObjectContent},
    der::parse_der,
};

use super::Error;

/// DER of the OID `id-ecPublicKey` (1.2.840.10045.2.1), content bytes only.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of the OID `prime256v1` (1.2.840.10045.3.1.7), content bytes only.
pub(crate) const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the OID `secp384r1` (1.3.132.0.34), content bytes only.
pub(crate) const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// Bytes as lowercase colon-separated hex, two digits per byte (`01:0a`), the form
/// Consul uses for serials, root IDs and key ids.
pub fn colon_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A root's ID: the SHA-1 fingerprint of its DER, colon-hex (Consul's `ID`). SHA-1 is
/// only a name here, never a security decision.
pub fn fingerprint(cert_der: &[u8]) -> String {
    colon_hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der).as_ref())
}

/// The same fingerprint as plain hex, used in store keys (no `:`).
pub fn fingerprint_key(id: &str) -> String {
    id.replace(':', "")
}

/// A CA key id: the 32 raw bytes of SHA-256 over the PKIX DER public key, as Consul's
/// built-in CA computes SubjectKeyId.
pub fn ca_key_id(spki_der: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, spki_der)
        .as_ref()
        .to_vec()
}

/// A random positive 128-bit certificate serial. The first byte is kept in 0x01..=0x7f
/// so the DER INTEGER is always exactly 16 bytes, positive, with no leading zero
/// (RFC 5280 §4.1.2.2: positive, at most 20 octets).
pub fn random_serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut s);
    s[0] = (s[0] & 0x7f).max(1);
    s
}

/// A random root serial that fits Consul's JSON number (a positive u64 below 2^63).
pub fn random_root_serial() -> u64 {
    (rand::random::<u64>() >> 1).max(1)
}

/// PEM text of one DER object.
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Every `CERTIFICATE` block of a PEM text, in order. Other blocks are skipped.
pub fn certs_from_pem(
    what: &'static str,
    text: &str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let blocks = pem::parse_many(text).map_err(|e| Error::Pem {
        what,
        reason: e.to_string(),
    })?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

/// Exactly one certificate from a PEM text.
pub fn one_cert_from_pem(what: &'static str, text: &str) -> Result<CertificateDer<'static>, Error> {
    let mut certs = certs_from_pem(what, text)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(Error::Pem {
            what,
            reason: format!("expected one CERTIFICATE block, found {n}"),
        }),
    }
}

/// An EC private key in PKCS#8 DER from PEM text holding either `PRIVATE KEY`
/// (PKCS#8) or `EC PRIVATE KEY` (SEC1, what Consul hands out).
pub fn ec_pkcs8_from_pem(what: &'static str, text: &str) -> Result<Vec<u8>, Error> {
    let block = pem::parse(text).map_err(|e| Error::Pem {
        what,
        reason: e.to_string(),
    })?;
    match block.tag() {
        "PRIVATE KEY" => Ok(block.into_contents()),
        "EC PRIVATE KEY" => sec1_to_pkcs8(block.contents()).ok_or(Error::Pem {
            what,
            reason: "the EC PRIVATE KEY is malformed or names no supported curve".to_owned(),
        }),
        other => Err(Error::Pem {
            what,
            reason: format!("expected PRIVATE KEY or EC PRIVATE KEY, found {other}"),
        }),
    }
}

/// The parts of an EC private key.
struct EcKey<'a> {
    curve_oid: &'static [u8],
    scalar: &'a [u8],
    public: &'a [u8],
}

/// SEC1 `EC PRIVATE KEY` PEM of a PKCS#8 EC key, with the curve named and the public
/// key included so that every consumer (openssl, Go's x509) can read it.
pub fn sec1_pem_from_pkcs8(pkcs8: &[u8]) -> Result<String, Error> {
    let key = parse_pkcs8_ec(pkcs8).ok_or(Error::Pem {
        what: "leaf private key",
        reason: "not a PKCS#8 EC key with a public key".to_owned(),
    })?;
    Ok(pem_encode("EC PRIVATE KEY", &sec1_der(&key)))
}

fn parse_pkcs8_ec(pkcs8: &[u8]) -> Option<EcKey<'_>> {
    let (_, info) = parse_der(pkcs8).ok()?;
    let items = seq(&info)?;
    let [_version, alg, private, ..] = items else {
        return None;
    };
    let alg = seq(alg)?;
    let [alg_oid, curve] = alg else {
        return None;
    };
    if !is_oid(alg_oid, OID_EC_PUBLIC_KEY) {
        return None;
    }
    let curve_oid = known_curve(curve)?;
    let BerObjectContent::OctetString(inner) = &private.content else {
        return None;
    };
    let (_, sec1) = parse_der(inner).ok()?;
    let (scalar, public) = sec1_parts(&sec1)?;
    Some(EcKey {
        curve_oid,
        scalar,
        public: public?,
    })
}

/// The private scalar and (if present) the public key of an ECPrivateKey.
fn sec1_parts<'a>(sec1: &BerObject<'a>) -> Option<(&'a [u8], Option<&'a [u8]>)> {
    let items = seq(sec1)?;
    let BerObjectContent::OctetString(scalar) = items.get(1)?.content else {
        return None;
    };
    let mut public = None;
    for item in items.iter().skip(2) {
        // [1] EXPLICIT BIT STRING publicKey; [0] is the curve, taken from elsewhere.
        if item.header.tag().0 == 1 {
            let BerObjectContent::Unknown(any) = &item.content else {
                continue;
            };
            let (_, bits) = parse_der(any.data).ok()?;
            if let BerObjectContent::BitString(_, b) = bits.content {
                public = Some(b.data);
            }
        }
    }
    Some((scalar, public))
}

fn sec1_curve(sec1: &BerObject<'_>) -> Option<&'static [u8]> {
    for item in seq(sec1)?.iter().skip(2) {
        if item.header.tag().0 == 0 {
            let BerObjectContent::Unknown(any) = &item.content else {
                continue;
            };
            let (_, oid) = parse_der(any.data).ok()?;
            return known_curve(&oid);
        }
    }
    None
}

fn sec1_to_pkcs8(sec1_der: &[u8]) -> Option<Vec<u8>> {
    let (_, sec1) = parse_der(sec1_der).ok()?;
    let curve = sec1_curve(&sec1)?;
    let (scalar, public) = sec1_parts(&sec1)?;
    // ring requires the public key inside the PKCS#8 document.
    let key = EcKey {
        curve_oid: curve,
        scalar,
        public: public?,
    };
    let alg = tlv(
        0x30,
        &[tlv(0x06, OID_EC_PUBLIC_KEY), tlv(0x06, key.curve_oid)].concat(),
    );
    // Inside PKCS#8 the curve is named by the algorithm, so the inner key omits it.
    let inner = tlv(
        0x30,
        &[
            tlv(0x02, &[1]),
            tlv(0x04, key.scalar),
            tlv(0xa1, &tlv(0x03, &[&[0u8][..], key.public].concat())),
        ]
        .concat(),
    );
    Some(tlv(
        0x30,
        &[tlv(0x02, &[0]), alg, tlv(0x04, &inner)].concat(),
    ))
}

fn sec1_der(key: &EcKey<'_>) -> Vec<u8> {
    tlv(
        0x30,
        &[
            tlv(0x02, &[1]),
            tlv(0x04, key.scalar),
            tlv(0xa0, &tlv(0x06, key.curve_oid)),
            tlv(0xa1, &tlv(0x03, &[&[0u8][..], key.public].concat())),
        ]
        .concat(),
    )
}

fn seq<'a, 'b>(o: &'b BerObject<'a>) -> Option<&'b [BerObject<'a>]> {
    match &o.content {
        BerObjectContent::Sequence(items) => Some(items),
        _ => None,
    }
}

/// Whether `o` is an OID with exactly these content bytes.
fn is_oid(o: &BerObject<'_>, want: &[u8]) -> bool {
    matches!(&o.content, BerObjectContent::OID(oid) if oid.as_bytes() == want)
}

/// The curve an OID object names, if it is one we support.
fn known_curve(o: &BerObject<'_>) -> Option<&'static [u8]> {
    [OID_P256, OID_P384].into_iter().find(|c| is_oid(o, c))
}

/// One DER TLV with a definite length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend([0x81, len as u8]);
    } else {
        // Keys and key containers are far below 64 KiB.
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colon_hex_formats() {
        let cases: [(&[u8], &str); 4] = [
            (&[], ""),
            (&[8], "08"),
            (&[1, 10], "01:0a"),
            (&[0xff, 0, 0xab], "ff:00:ab"),
        ];
        for (bytes, want) in cases {
            assert_eq!(colon_hex(bytes), want);
        }
    }

    #[test]
    fn serials_are_positive_and_sixteen_bytes() {
        for _ in 0..256 {
            let s = random_serial();
            assert!((1..=0x7f).contains(&s[0]), "{s:?}");
        }
        for _ in 0..256 {
            let s = random_root_serial();
            assert!((1..(1 << 63)).contains(&s));
        }
    }

    #[test]
    fn pkcs8_and_sec1_round_trip() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).expect("keygen");
            let sec1 = sec1_pem_from_pkcs8(kp.serialized_der()).expect("to sec1");
            assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
            let back = ec_pkcs8_from_pem("test key", &sec1).expect("from sec1");
            let kp2 = rcgen::KeyPair::try_from(back.as_slice()).expect("ring accepts it");
            assert_eq!(kp.public_key_raw(), kp2.public_key_raw());
            let pk8 = ec_pkcs8_from_pem("test key", &kp.serialize_pem()).expect("pkcs8");
            assert_eq!(pk8, kp.serialized_der());
        }
    }

    #[test]
    fn bad_key_pem_is_an_error() {
        for bad in [
            "",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        ] {
            assert!(ec_pkcs8_from_pem("test key", bad).is_err(), "{bad:?}");
        }
    }
}
