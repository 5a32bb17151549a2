//! Export a batch of names, isolating the bad ones so their batch-mates still land.
//!
//! KPS fails a whole batch when one name does not exist or is not hosted, without saying which.
//! A per-key error therefore splits the batch in halves until the bad name stands alone. A name
//! missing from an otherwise good zip falls back to the single-export call.

use std::future::Future;
use std::pin::Pin;

use crate::archive::{self, Limits};
use crate::kps::{KpsClient, KpsError};
use crate::secret::SecretBytes;

/// Why one key could not be exported.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Kps(KpsError),
    /// The zip was refused as a whole (hostile or corrupt); nothing from it was used.
    #[error("{0}")]
    Archive(String),
}

impl ExportError {
    /// `KPS.6004`, `archive`, ...
    pub fn code(&self) -> String {
        match self {
            ExportError::Kps(e) => e.code_label(),
            ExportError::Archive(_) => "archive".into(),
        }
    }
}

pub type Exported = Vec<(String, Result<SecretBytes, ExportError>)>;

/// Export up to 10 names; one result per name, in no particular order.
pub fn export_batch<'a>(
    client: &'a KpsClient,
    names: &'a [String],
) -> Pin<Box<dyn Future<Output = Exported> + Send + 'a>> {
    Box::pin(async move {
        match client.batch_export(names).await {
            Ok(zip) => match archive::unpack(zip.expose(), names, &Limits::default()) {
                Ok(unpacked) => {
                    let mut out: Exported = unpacked
                        .keys
                        .into_iter()
                        .map(|(name, key)| (name, Ok(key)))
                        .collect();
                    for name in unpacked.missing {
                        tracing::info!(key = %name, "name missing from the batch zip; using the single export call");
                        let result = client
                            .export(&name)
                            .await
                            .map(|key| SecretBytes::new(key.expose().as_bytes().to_vec()))
                            .map_err(ExportError::Kps);
                        out.push((name, result));
                    }
                    out
                }
                Err(e) => {
                    let message = e.to_string();
                    names
                        .iter()
                        .map(|n| (n.clone(), Err(ExportError::Archive(message.clone()))))
                        .collect()
                }
            },
            Err(e) if e.is_per_key() && names.len() > 1 => {
                let (left, right) = names.split_at(names.len() / 2);
                tracing::debug!(batch = names.len(), code = %e.code_label(), "a name in the batch is bad; splitting to isolate it");
                let mut out = export_batch(client, left).await;
                out.extend(export_batch(client, right).await);
                out
            }
            Err(e) => names
                .iter()
                .map(|n| (n.clone(), Err(ExportError::Kps(e.clone()))))
                .collect(),
        }
    })
}
