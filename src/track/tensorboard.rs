//! TensorBoard event files: TFRecord framing around hand-encoded `Event` protobufs.
//!
//! Only the handful of message fields TensorBoard needs for scalars, text and the HParams plugin
//! are encoded, which is some lines of protobuf wire format instead of a generated-code
//! dependency.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Appends events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Starts a new event file in `dir` (TensorBoard reads every event file of a directory as
    /// one run, so a resumed run adds a file beside the first).
    pub fn create(dir: &Path) -> Result<Self> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let host = super::host_name();
        // Zero-padded nanoseconds keep names sorting in creation order even within a second:
        // TensorBoard reads a run's files in name order, and a resumed run's must come last.
        let name = format!(
            "events.out.tfevents.{}.{}.{}.{:09}",
            now.as_secs(),
            host,
            std::process::id(),
            now.subsec_nanos()
        );
        let path = dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut writer = Self {
            file: BufWriter::new(file),
            path,
        };
        let mut event = event_header(0);
        string_field(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks a (re)start at `step`: TensorBoard then drops events of an earlier run at this step
    /// or later, so a resumed run does not show the interrupted run's orphaned tail.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let mut event = event_header(step);
        let mut session_log = Vec::new();
        varint_field(&mut session_log, 1, 1); // SessionLog.status = START
        bytes_field(&mut event, 7, &session_log); // Event.session_log (6 is log_message)
        self.write_record(&event)
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> Result<()> {
        let mut value_msg = Vec::new();
        string_field(&mut value_msg, 1, tag.as_bytes());
        key(&mut value_msg, 2, 5);
        value_msg.extend_from_slice(&value.to_le_bytes());
        self.write_summary(step, &value_msg)
    }

    /// A text summary as the text plugin stores it: a rank-0 DT_STRING tensor.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> Result<()> {
        let metadata = plugin_metadata("text", &[]);
        let mut tensor = Vec::new();
        varint_field(&mut tensor, 1, 7); // dtype = DT_STRING
        bytes_field(&mut tensor, 2, &[]); // tensor_shape: rank 0
        bytes_field(&mut tensor, 8, text.as_bytes()); // string_val
        let mut value_msg = Vec::new();
        string_field(&mut value_msg, 1, tag.as_bytes());
        bytes_field(&mut value_msg, 8, &tensor);
        bytes_field(&mut value_msg, 9, &metadata);
        self.write_summary(step, &value_msg)
    }

    /// A summary whose whole meaning is its plugin data (`SummaryMetadata.plugin_data.content`),
    /// as the HParams plugin's summaries are. The tensor is the empty float vector TensorBoard's
    /// own hparams writers attach: the plugin never reads it, but readers that index tensors
    /// (`EventAccumulator.Tensors`, TensorFlow's summary readers) expect every plugin summary
    /// to carry one.
    pub fn plugin_summary(
        &mut self,
        tag: &str,
        step: u64,
        plugin_name: &str,
        content: &[u8],
    ) -> Result<()> {
        let mut shape = Vec::new();
        bytes_field(&mut shape, 2, &[]); // one dim of size 0 (the default, so no size field)
        let mut tensor = Vec::new();
        varint_field(&mut tensor, 1, 1); // dtype = DT_FLOAT
        bytes_field(&mut tensor, 2, &shape);
        let mut value_msg = Vec::new();
        string_field(&mut value_msg, 1, tag.as_bytes());
        bytes_field(&mut value_msg, 8, &tensor);
        bytes_field(&mut value_msg, 9, &plugin_metadata(plugin_name, content));
        self.write_summary(step, &value_msg)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    fn write_summary(&mut self, step: u64, value_msg: &[u8]) -> Result<()> {
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, value_msg);
        let mut event = event_header(step);
        bytes_field(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// TFRecord framing: length, masked CRC of the length, data, masked CRC of the data.
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&record)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// `SummaryMetadata { plugin_data { plugin_name, content } }`.
fn plugin_metadata(plugin_name: &str, content: &[u8]) -> Vec<u8> {
    let mut plugin_data = Vec::new();
    string_field(&mut plugin_data, 1, plugin_name.as_bytes());
    if !content.is_empty() {
        bytes_field(&mut plugin_data, 2, content);
    }
    let mut metadata = Vec::new();
    bytes_field(&mut metadata, 1, &plugin_data);
    metadata
}

fn event_header(step: u64) -> Vec<u8> {
    let wall_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    varint_field(&mut event, 2, step);
    event
}

// The wire-format helpers are shared with `hparams`, whose messages are built the same way.

fn key(buf: &mut Vec<u8>, field: u32, wire_type: u32) {
    varint(buf, ((field << 3) | wire_type) as u64);
}

fn varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

pub(super) fn varint_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    key(buf, field, 0);
    varint(buf, value);
}

pub(super) fn bytes_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(buf, field, 2);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

pub(super) fn string_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    bytes_field(buf, field, bytes)
}

/// A `double` (wire type 1: eight little-endian bytes).
pub(super) fn double_field(buf: &mut Vec<u8>, field: u32, value: f64) {
    key(buf, field, 1);
    buf.extend_from_slice(&value.to_le_bytes());
}

/// CRC-32C (Castagnoli), reflected, as TFRecord uses.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in data {
        crc = TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value from the iSCSI spec (RFC 3720).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varint_encodes_multi_byte_values() {
        let mut buf = Vec::new();
        varint(&mut buf, 300);
        assert_eq!(buf, [0xAC, 0x02]);
    }
}
