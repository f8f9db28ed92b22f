//! The built-in detectors, installed into the queries directory and
//! upgraded when unedited.

use super::*;

include!(concat!(env!("OUT_DIR"), "/builtin_detectors.rs"));

/// Writes the built-in detectors into `dir` (which then can be edited).
/// See [`install`].
pub fn install_builtin(dir: &Path) -> Result<(), DetectError> {
    install(dir, &BUILTIN, &SHIPPED_BEFORE_RECORD)
}

/// Where [`install`] records what it wrote: one `name sha256` line per
/// detector file.
pub(super) const INSTALLED: &str = ".builtin-sha256";

/// SHA-256 of every built-in detector text that versions before the
/// [`INSTALLED`] record shipped (those kept no record; from the
/// repository's history, 0cb15e8 to be4fbf9): a copy equal to one of them
/// is unedited, so an upgrade replaces it as well, the way dpkg recognises
/// an unchanged conffile. Frozen: every later text is recorded when it is
/// installed.
pub(super) const SHIPPED_BEFORE_RECORD: [(&str, &str); 11] = [
    (
        "canary_latency.sql",
        "10391f0aba9f8932ff48e3fa01266931c884a3b4e51cf2e76ad9ba6947bff7c3",
    ),
    (
        "canary_latency.sql",
        "d38cd996c953ff47d060167973b5d62e24cabd312d3c3e93fa3aa18216300e73",
    ),
    (
        "canary_latency.sql",
        "d5f01ed3207a3105ad8b431153699aea4875ca9ae977df12b082ba96b077417f",
    ),
    (
        "custom_drift.sql",
        "0b12c6a884bda76ab2f5ae173d1b69dbd4fe8a2492459b656dc2b7137e412434",
    ),
    (
        "error_rate.sql",
        "8cf5dcbf691e613481f38ade7ac35f78b5ce9e22b16264b8f7473a9e1083c913",
    ),
    (
        "input_drift.sql",
        "3379b608832e0e3f690d4b67abbf3edbb805e3a067c1bc3fa17288c9b4c42e24",
    ),
    (
        "label_drift.sql",
        "0107f3f9e706b502e0560a68fa810dcef45978e8046711c30804da5f05656518",
    ),
    (
        "latency_regression.sql",
        "2c00010666f5939d1ddf11d6dc3e68658d4225ebe0200c826335f9ac9b3db620",
    ),
    (
        "latency_regression.sql",
        "2e948f90fe582471b04838903f2b8d127792ee7cdba97f74e7525098c5a73b94",
    ),
    (
        "negative_feedback.sql",
        "2106226490727afb91e0faad33839db5784d3e0d288dbf2ce13433a2ae6696e7",
    ),
    (
        "prediction_drift.sql",
        "e1a337624a95e1b309963ae8cd5ee229fa3c321408cb96cb34eec88f40b1786b",
    ),
];

/// Writes `detectors` into `dir`: a missing file is written; a file still
/// as this function last wrote it, or equal to a text of `shipped` (name
/// and SHA-256 of texts installed before the record existed), is replaced
/// by the new text, so upgrades reach unedited copies; an edited file (or
/// one of unknown origin) is kept, with a warning when the built-in text
/// differs from it.
pub(super) fn install(
    dir: &Path,
    detectors: &[(&str, &str)],
    shipped: &[(&str, &str)],
) -> Result<(), DetectError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DetectError::Read { path, source }
    };
    std::fs::create_dir_all(dir).map_err(error(dir))?;
    let record = dir.join(INSTALLED);
    let installed: HashMap<String, String> = std::fs::read_to_string(&record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, hash)| (name.to_owned(), hash.to_owned()))
        .collect();
    let mut lines = Vec::new();
    for (name, text) in detectors {
        let path = dir.join(name);
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(error(&path)(e)),
        };
        let unedited = current.as_ref().is_some_and(|c| {
            let hash = sha256(c);
            installed.get(*name) == Some(&hash) || shipped.contains(&(*name, hash.as_str()))
        });
        match current {
            Some(c) if c == text.as_bytes() => {}
            Some(_) if !unedited => {
                tracing::warn!(
                    path = %path.display(),
                    "this detector differs from the built-in one and from every text an earlier version installed (edited): kept; delete it to get the current one"
                );
                continue;
            }
            previous => {
                std::fs::write(&path, text).map_err(error(&path))?;
                if previous.is_some() {
                    tracing::info!(path = %path.display(), "built-in detector updated");
                }
            }
        }
        lines.push(format!("{name} {}\n", sha256(text.as_bytes())));
    }
    std::fs::write(&record, lines.concat()).map_err(error(&record))?;
    Ok(())
}

/// The SHA-256 of `text`, in lowercase hex.
pub(crate) fn sha256(text: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, text)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
