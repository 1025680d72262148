//! Per-peer store-and-forward on disk: an SQLite file holding the batches not yet
//! acknowledged by one peer, and the high-water mark of batches applied *from* that
//! peer.
//!
//! On-disk format (schema version 2):
//!
//! ```text
//! batches(seq INTEGER PRIMARY KEY, at_us INTEGER NOT NULL, samples INTEGER NOT NULL,
//!         bytes BLOB NOT NULL)
//!     seq     batch sequence number, >= 1, strictly increasing, never reused
//!     at_us   wall-clock unix µs when the batch was appended (for max_age)
//!     samples number of samples in `bytes` (so counters need no decoding)
//!     bytes   the proto sample block (`proto::encode_samples`): one format only
//!             (version 2 may end with a relay path table; see spool/block.rs)
//! meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)
//!     schema_version, next_seq, dropped_batches, dropped_samples, applied,
//!     received:<peer> (sink spools only: the peer batch seq last appended, see
//!     `append_received`; an older build ignores the row)
//! ```
//!
//! Versions: schema 1 differs only in its blocks, which never carry a path table, and
//! every version-1 block is a valid version-2 block. Opening a schema-1 file marks it
//! version 2 (one meta row, nothing rewritten) and delivers what it holds; a build that
//! only reads version 1 then refuses the file by its version instead of meeting a
//! path table it cannot decode.
//!
//! Durability: WAL journal with `synchronous=FULL`. In WAL mode `NORMAL` only syncs
//! at checkpoints, so a power cut can roll back the last committed transactions; with
//! `FULL` every commit fsyncs the WAL before returning, so a batch whose `append`
//! returned (and an `applied` mark whose `set_applied` returned) survives power loss.
//! That is the guarantee the link needs: we ack a peer's batch only after its applied
//! mark is durable, and we drop our own batch only after the peer acked it.
//!
//! Invariants: every mutation is one transaction (rows and meta change together);
//! `next_seq` lives in meta, so seqs are never reused, even after every row was acked
//! or the process restarted; `applied` never moves backwards; bounds drop the oldest
//! batches first, count them in meta and log at ERROR (data is lost), but never the
//! batch just appended.
//!
//! Blocking: rusqlite is synchronous and `FULL` means an fsync per commit. Call it from
//! a dedicated thread or `tokio::task::spawn_blocking`, never directly on a runtime
//! worker.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::point::value::Sample;
use crate::spool::block::{self as proto, ProtoError};

const SCHEMA_VERSION: i64 = 2;
/// The older schema this build upgrades on open (see the header).
const SCHEMA_VERSION_1: i64 = 1;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Drops recur at every append while a peer stays away: ERROR at most this often, with
/// what was dropped since the last ERROR; debug in between.
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Errors of the spool; each names the spool file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// SQLite failed (cannot open, not a database, disk full, ...).
    #[error("spool {path}: {op}: {source}")]
    Sqlite {
        /// The spool file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The file was written by an incompatible version of the gateway.
    #[error("spool {path}: unsupported schema version {found} (this build reads version {SCHEMA_VERSION})")]
    Schema {
        /// The spool file.
        path: PathBuf,
        /// Version found in meta.
        found: i64,
    },
    /// A stored batch does not decode.
    #[error("spool {path}: batch {seq} is corrupt: {source}")]
    Corrupt {
        /// The spool file.
        path: PathBuf,
        /// The batch.
        seq: u64,
        /// Why it does not decode.
        source: ProtoError,
    },
    /// A batch cannot be encoded (a string too long for the wire format).
    #[error("spool {path}: cannot encode batch: {source}")]
    Encode {
        /// The spool file.
        path: PathBuf,
        /// Why.
        source: ProtoError,
    },
    /// `append` of no samples.
    #[error("spool {path}: refusing to append an empty batch")]
    Empty {
        /// The spool file.
        path: PathBuf,
    },
    /// The peer acknowledged a seq no spool can reach (above [`MAX_ACK`]): a broken
    /// peer, not a reset spool; nothing is removed or renumbered.
    #[error("spool {path}: the peer acknowledged seq {seq}, above the largest a spool can issue ({MAX_ACK})")]
    AckRange {
        /// The spool file.
        path: PathBuf,
        /// The seq the peer sent.
        seq: u64,
    },
}

/// The largest seq a peer may acknowledge. Seqs are stored as SQLite integers (i64); a
/// renumbering after a reset must stay well inside that range.
pub const MAX_ACK: u64 = (i64::MAX as u64) / 2;

/// A stored batch: its seq and its (point, sample) pairs.
pub type StoredBatch = (u64, Vec<(String, Sample)>);

/// Bounds of one spool. When exceeded on append, the oldest batches are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Maximum total size of the stored sample blocks, in bytes.
    pub max_bytes: u64,
    /// Maximum age of a stored batch (time since it was appended).
    pub max_age: Duration,
}

impl Default for SpoolLimits {
    /// 256 MiB and 7 days.
    fn default() -> Self {
        Self { max_bytes: 256 << 20, max_age: Duration::from_secs(7 * 24 * 3600) }
    }
}

/// What is waiting to be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// Stored batches.
    pub batches: u64,
    /// Samples in them.
    pub samples: u64,
    /// Bytes of their sample blocks.
    pub bytes: u64,
}

/// Data lost to the bounds since the spool file was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dropped {
    /// Batches dropped.
    pub batches: u64,
    /// Samples in them.
    pub samples: u64,
}

/// One peer's spool file. Not `Sync`: owned by one thread (see the module header).
#[derive(Debug)]
pub struct Spool {
    conn: Connection,
    path: PathBuf,
    limits: SpoolLimits,
    next_seq: u64,
    applied: u64,
    pending: Pending,
    dropped: Dropped,
    /// Reused encode buffer, so a 1000-sample append does not reallocate.
    buf: BytesMut,
    /// When drops were last logged at ERROR, and what was dropped since.
    drop_logged: Option<std::time::Instant>,
    unlogged: Dropped,
}

/// Checks, without changing anything, that the existing file at `path` is a spool this
/// build can open: an SQLite database holding the spool's schema version. An empty file
/// passes ([`Spool::open`] makes it a spool). `check` uses it before `run` would open.
pub fn inspect(path: &Path) -> Result<(), SpoolError> {
    let err = |op| {
        let path = path.to_path_buf();
        move |source| SpoolError::Sqlite { path, op, source }
    };
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Ok(());
    }
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(err("cannot open"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err("cannot set busy timeout"))?;
    let found: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
        .map_err(err("not a spool file (cannot read its schema version)"))?;
    if found != SCHEMA_VERSION && found != SCHEMA_VERSION_1 {
        return Err(SpoolError::Schema { path: path.to_path_buf(), found });
    }
    Ok(())
}

impl Spool {
    /// Opens (creating if needed) the spool file at `path`.
    pub fn open(path: &Path, limits: SpoolLimits) -> Result<Self, SpoolError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| SpoolError::Sqlite { path, op, source }
        };
        let conn = Connection::open(path).map_err(err("cannot open"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err("cannot set busy timeout"))?;
        // The first statement that reads the file: a non-SQLite file fails here with
        // "file is not a database".
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err("cannot open as sqlite database"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "spool: wal journal not available, durability unchanged but slower");
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(err("cannot set synchronous=FULL"))?;
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS batches(
                 seq INTEGER PRIMARY KEY, at_us INTEGER NOT NULL,
                 samples INTEGER NOT NULL, bytes BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT OR IGNORE INTO meta(key, value) VALUES
                 ('schema_version', 2), ('next_seq', 1), ('dropped_batches', 0),
                 ('dropped_samples', 0), ('applied', 0);
             COMMIT;",
        )
        .map_err(err("cannot create schema"))?;

        let meta = |key: &str| -> Result<i64, SpoolError> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .map_err(err("cannot read meta"))
        };
        let found = meta("schema_version")?;
        if found == SCHEMA_VERSION_1 {
            conn.execute("UPDATE meta SET value = ?1 WHERE key = 'schema_version'", [SCHEMA_VERSION])
                .map_err(err("cannot upgrade the spool to schema version 2"))?;
            tracing::info!(path = %path.display(), "spool file of the previous version upgraded; its batches are kept and sent");
        } else if found != SCHEMA_VERSION {
            return Err(SpoolError::Schema { path: path.to_path_buf(), found });
        }
        let next_seq = meta("next_seq")? as u64;
        let applied = meta("applied")? as u64;
        let dropped =
            Dropped { batches: meta("dropped_batches")? as u64, samples: meta("dropped_samples")? as u64 };
        let (batches, samples, bytes, max_seq): (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(samples), 0), COALESCE(SUM(length(bytes)), 0),
                        COALESCE(MAX(seq), 0) FROM batches",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(err("cannot count pending batches"))?;
        // Belt and braces: never hand out a seq that is still stored.
        let next_seq = next_seq.max(max_seq as u64 + 1);
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            limits,
            next_seq,
            applied,
            pending: Pending { batches: batches as u64, samples: samples as u64, bytes: bytes as u64 },
            dropped,
            buf: BytesMut::new(),
            drop_logged: None,
            unlogged: Dropped::default(),
        })
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> SpoolError + use<> {
        let path = self.path.clone();
        move |source| SpoolError::Sqlite { path, op, source }
    }

    /// Stores a batch durably and returns its seq. Then enforces the limits (dropping
    /// the oldest batches, never this one). Uses the wall clock; see [`Spool::append_at`].
    pub fn append(&mut self, samples: &[(String, Sample)]) -> Result<u64, SpoolError> {
        self.append_at(samples, SystemTime::now())
    }

    /// [`Spool::append`] with an explicit `now` (the append time stored for max_age).
    pub fn append_at(&mut self, samples: &[(String, Sample)], now: SystemTime) -> Result<u64, SpoolError> {
        if samples.is_empty() {
            return Err(SpoolError::Empty { path: self.path.clone() });
        }
        self.buf.clear();
        proto::encode_samples(samples, &mut self.buf)
            .map_err(|source| SpoolError::Encode { path: self.path.clone(), source })?;
        let now_us = unix_micros(now);
        let seq = self.next_seq;
        let e = self.sql("cannot append batch");
        let block = &self.buf[..];
        in_transaction(&mut self.conn, |tx| {
            tx.prepare_cached("INSERT INTO batches(seq, at_us, samples, bytes) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![seq as i64, now_us, samples.len() as i64, block])?;
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
                .execute([seq as i64 + 1])?;
            Ok(())
        })
        .map_err(e)?;
        self.next_seq = seq + 1;
        self.pending.batches += 1;
        self.pending.samples += samples.len() as u64;
        self.pending.bytes += self.buf.len() as u64;
        self.enforce_limits(seq, now_us)?;
        Ok(seq)
    }

    /// Drops the oldest batches (never `newest`) while over max_bytes or older than
    /// max_age.
    fn enforce_limits(&mut self, newest: u64, now_us: i64) -> Result<(), SpoolError> {
        let cutoff =
            now_us.saturating_sub(i64::try_from(self.limits.max_age.as_micros()).unwrap_or(i64::MAX));
        let oldest_at: Option<i64> = self
            .conn
            .prepare_cached("SELECT at_us FROM batches ORDER BY seq LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(self.sql("cannot read oldest batch"))?;
        let too_old = oldest_at.is_some_and(|at| at < cutoff);
        let too_big = self.pending.bytes > self.limits.max_bytes;
        if !too_old && !too_big {
            return Ok(());
        }
        // Choose the cut: every batch older than max_age, then more of the oldest until
        // under max_bytes. `newest` is never dropped.
        let mut cut = 0u64;
        let (mut batches, mut samples, mut bytes) = (0u64, 0u64, 0u64);
        {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT seq, at_us, samples, length(bytes) FROM batches WHERE seq < ?1 ORDER BY seq",
                )
                .map_err(self.sql("cannot scan batches"))?;
            let mut rows = stmt.query([newest as i64]).map_err(self.sql("cannot scan batches"))?;
            while let Some(row) = rows.next().map_err(self.sql("cannot scan batches"))? {
                let get = |row: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, i64, i64, i64)> {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                };
                let (seq, at_us, n, len) = get(row).map_err(self.sql("cannot scan batches"))?;
                let over = self.pending.bytes - bytes > self.limits.max_bytes;
                if at_us >= cutoff && !over {
                    break;
                }
                cut = seq as u64;
                batches += 1;
                samples += n as u64;
                bytes += len as u64;
            }
        }
        if batches == 0 {
            return Ok(());
        }
        let e = self.sql("cannot drop batches");
        in_transaction(&mut self.conn, |tx| {
            tx.prepare_cached("DELETE FROM batches WHERE seq <= ?1")?.execute([cut as i64])?;
            tx.prepare_cached("UPDATE meta SET value = value + ?1 WHERE key = 'dropped_batches'")?
                .execute([batches as i64])?;
            tx.prepare_cached("UPDATE meta SET value = value + ?1 WHERE key = 'dropped_samples'")?
                .execute([samples as i64])?;
            Ok(())
        })
        .map_err(e)?;
        self.pending.batches -= batches;
        self.pending.samples -= samples;
        self.pending.bytes -= bytes;
        self.dropped.batches += batches;
        self.dropped.samples += samples;
        self.unlogged.batches += batches;
        self.unlogged.samples += samples;
        if self.drop_logged.is_some_and(|t| t.elapsed() < DROP_LOG_EVERY) {
            tracing::debug!(spool = %self.path.display(), batches, samples, upto_seq = cut, "spool dropped the oldest batches");
            return Ok(());
        }
        self.drop_logged = Some(std::time::Instant::now());
        let Dropped { batches, samples } = std::mem::take(&mut self.unlogged);
        tracing::error!(
            spool = %self.path.display(),
            dropped_batches = batches,
            dropped_samples = samples,
            upto_seq = cut,
            total_dropped_batches = self.dropped.batches,
            total_dropped_samples = self.dropped.samples,
            max_bytes = self.limits.max_bytes,
            max_age = ?self.limits.max_age,
            "spool over its limits: dropped the oldest batches, data lost (counts since the last such line; \
             repeated at most every {DROP_LOG_EVERY:?})"
        );
        Ok(())
    }

    /// Up to `max_batches` stored batches with seq > `after_seq`, oldest first, decoded.
    pub fn read_from(&self, after_seq: u64, max_batches: usize) -> Result<Vec<StoredBatch>, SpoolError> {
        self.read_raw_from(after_seq, max_batches)?
            .into_iter()
            .map(|(seq, block)| {
                proto::decode_samples(&block).map(|s| (seq, s)).map_err(|source| SpoolError::Corrupt {
                    path: self.path.clone(),
                    seq,
                    source,
                })
            })
            .collect()
    }

    /// Like [`Spool::read_from`] but returns the stored sample blocks undecoded, ready
    /// for [`proto::encode_batch_raw`] (the fast path to the socket).
    pub fn read_raw_from(
        &self,
        after_seq: u64,
        max_batches: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let e = || self.sql("cannot read batches");
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, bytes FROM batches WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(e())?;
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(max_batches).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![after, limit], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)))
            .map_err(e())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(e())
    }

    /// The peer applied every batch with seq <= `upto`: removes them and returns how
    /// many rows went.
    ///
    /// If `upto` is at or beyond our `next_seq`, the peer has applied seqs we never
    /// issued: this spool file was reset (deleted or restored from an old copy). Then
    /// every pending batch is renumbered to follow `upto`, so the peer's dedupe does not
    /// discard it, and `next_seq` continues after them; nothing is removed.
    pub fn ack(&mut self, upto: u64) -> Result<usize, SpoolError> {
        if upto >= self.next_seq {
            if upto > MAX_ACK {
                return Err(SpoolError::AckRange { path: self.path.clone(), seq: upto });
            }
            self.rebase(upto)?;
            return Ok(0);
        }
        let e = self.sql("cannot remove acknowledged batches");
        let upto_i = upto as i64;
        let (n, samples, bytes) = in_transaction(&mut self.conn, |tx| {
            let (n, samples, bytes): (i64, i64, i64) = tx
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(samples), 0), COALESCE(SUM(length(bytes)), 0)
                     FROM batches WHERE seq <= ?1",
                )?
                .query_row([upto_i], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            if n > 0 {
                tx.prepare_cached("DELETE FROM batches WHERE seq <= ?1")?.execute([upto_i])?;
            }
            Ok((n as u64, samples as u64, bytes as u64))
        })
        .map_err(e)?;
        self.pending.batches -= n;
        self.pending.samples -= samples;
        self.pending.bytes -= bytes;
        Ok(n as usize)
    }

    fn rebase(&mut self, upto: u64) -> Result<(), SpoolError> {
        // All stored seqs are < next_seq <= upto, so seq + shift (> upto) never collides
        // with a stored seq during the update.
        let shift = upto + 1 - self.first_seq_or_next()?;
        let next = self.next_seq + shift;
        let e = self.sql("cannot renumber batches");
        in_transaction(&mut self.conn, |tx| {
            tx.execute("UPDATE batches SET seq = seq + ?1", [shift as i64])?;
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_seq'", [next as i64])?;
            Ok(())
        })
        .map_err(e)?;
        tracing::warn!(
            spool = %self.path.display(),
            peer_applied = upto,
            our_next_seq = self.next_seq,
            renumbered = self.pending.batches,
            "spool: peer has applied seqs this spool never issued (spool reset); renumbered pending batches after them"
        );
        self.next_seq = next;
        Ok(())
    }

    fn first_seq_or_next(&self) -> Result<u64, SpoolError> {
        let first: Option<i64> = self
            .conn
            .query_row("SELECT MIN(seq) FROM batches", [], |r| r.get(0))
            .map_err(self.sql("cannot read first batch"))?;
        Ok(first.map_or(self.next_seq, |s| s as u64))
    }

    /// Batches, samples and bytes waiting for an ack.
    pub fn pending(&self) -> Pending {
        self.pending
    }

    /// When the oldest batch waiting for an ack was appended (`None`: nothing waits).
    pub fn oldest_pending(&self) -> Result<Option<SystemTime>, SpoolError> {
        if self.pending.batches == 0 {
            return Ok(None);
        }
        let at: Option<i64> = self
            .conn
            .prepare_cached("SELECT at_us FROM batches ORDER BY seq LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(self.sql("cannot read oldest batch"))?;
        Ok(at.map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)))
    }

    /// The seq the next append will get (>= 1).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The highest seq applied from this peer's incoming batches (0 = none): send it as
    /// `Hello.resume`, and drop incoming batches with seq <= it as duplicates.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Durably records that incoming batches up to `seq` were applied (call before
    /// sending the `Ack`). Never moves backwards: a lower `seq` is ignored.
    pub fn set_applied(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.applied {
            return Ok(());
        }
        self.conn
            .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'applied'")
            .and_then(|mut s| s.execute([seq as i64]))
            .map_err(self.sql("cannot record applied seq"))?;
        self.applied = seq;
        Ok(())
    }

    /// Appends `samples`, received from peer `from` in its batches up to `seq`, and
    /// records `seq` in the same transaction, so a batch the peer re-sends after a crash
    /// is never appended twice. `None` (nothing appended) when `seq` is not past the
    /// recorded mark. Used by the spools of sinks fed from peers (a PLC mapping received
    /// points); limits apply as for [`Spool::append`].
    pub fn append_received(
        &mut self,
        samples: &[(String, Sample)],
        from: &str,
        seq: u64,
    ) -> Result<Option<u64>, SpoolError> {
        if seq <= self.received_mark(from)? {
            return Ok(None);
        }
        if samples.is_empty() {
            return Err(SpoolError::Empty { path: self.path.clone() });
        }
        self.buf.clear();
        proto::encode_samples(samples, &mut self.buf)
            .map_err(|source| SpoolError::Encode { path: self.path.clone(), source })?;
        let now_us = unix_micros(SystemTime::now());
        let next = self.next_seq;
        let key = format!("received:{from}");
        let e = self.sql("cannot append received batch");
        let block = &self.buf[..];
        in_transaction(&mut self.conn, |tx| {
            tx.prepare_cached("INSERT INTO batches(seq, at_us, samples, bytes) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![next as i64, now_us, samples.len() as i64, block])?;
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
                .execute([next as i64 + 1])?;
            tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)")?
                .execute(params![key, seq as i64])?;
            Ok(())
        })
        .map_err(e)?;
        self.next_seq = next + 1;
        self.pending.batches += 1;
        self.pending.samples += samples.len() as u64;
        self.pending.bytes += self.buf.len() as u64;
        self.enforce_limits(next, now_us)?;
        Ok(Some(next))
    }

    /// The highest batch seq of peer `from` whose samples [`Spool::append_received`]
    /// took (0: none).
    pub fn received_mark(&self, from: &str) -> Result<u64, SpoolError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [format!("received:{from}")], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
            .map_err(self.sql("cannot read received mark"))
    }

    /// Data lost to the limits since the file was created.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// The configured limits.
    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }
}

/// Runs `f` in one IMMEDIATE transaction and commits it; rolls back on error.
fn in_transaction<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}

fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::value::{Quality, Value};

    fn batch(n: usize, base: i64) -> Vec<(String, Sample)> {
        (0..n)
            .map(|i| {
                (
                    format!("line1/dev{}/p{i}", i % 7),
                    Sample {
                        value: Some(Value::Int(base + i as i64)),
                        at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000 + i as u64),
                        quality: Quality::Good,
                        via: None,
                    },
                )
            })
            .collect()
    }

    fn open(dir: &tempfile::TempDir, limits: SpoolLimits) -> Spool {
        Spool::open(&dir.path().join("peer.spool"), limits).expect("open spool")
    }

    #[test]
    fn inspect_accepts_spools_and_empty_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("peer.spool");
        drop(open(&dir, SpoolLimits::default()));
        inspect(&path).expect("a spool");
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, "").expect("write");
        inspect(&empty).expect("an empty file becomes a spool");
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, "not a database, not empty").expect("write");
        assert!(matches!(inspect(&junk), Err(SpoolError::Sqlite { .. })));
        let conn = Connection::open(&path).expect("open");
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'", []).expect("update");
        drop(conn);
        assert!(matches!(inspect(&path), Err(SpoolError::Schema { found: 99, .. })));
    }

    /// A spool file exactly as the previous version (schema 1) left it: its pending
    /// batches are read and delivered after the upgrade, and new batches follow them.
    #[test]
    fn a_schema_1_file_is_upgraded_and_its_batches_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("peer.spool");
        // The schema-1 DDL and meta rows, and two version-1 blocks written byte by byte
        // (one sample `p` = int -1 at 2 µs, good; then `q` = int 7 at 3 µs).
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch(
            "CREATE TABLE batches(seq INTEGER PRIMARY KEY, at_us INTEGER NOT NULL,
                 samples INTEGER NOT NULL, bytes BLOB NOT NULL);
             CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta(key, value) VALUES ('schema_version', 1), ('next_seq', 8),
                 ('dropped_batches', 0), ('dropped_samples', 0), ('applied', 41);",
        )
        .expect("schema 1");
        let v1 = |name: u8, at: u8, v: [u8; 8]| {
            let mut b = vec![0, 0, 0, 1, 0, 1, name, 0, 0, 0, 0, 0, 0, 0, at, 0, 2];
            b.extend_from_slice(&v);
            b
        };
        for (seq, block) in [(6i64, v1(b'p', 2, [0xff; 8])), (7, v1(b'q', 3, 7i64.to_be_bytes()))] {
            conn.execute(
                "INSERT INTO batches(seq, at_us, samples, bytes) VALUES (?1, ?2, 1, ?3)",
                params![seq, unix_micros(SystemTime::now()), block],
            )
            .expect("insert");
        }
        drop(conn);
        inspect(&path).expect("check accepts the previous version");
        let mut s = Spool::open(&path, SpoolLimits::default()).expect("open the old file");
        assert_eq!((s.pending().batches, s.applied(), s.next_seq()), (2, 41, 8));
        let got = s.read_from(0, 10).expect("read");
        let at = |us| UNIX_EPOCH + Duration::from_micros(us);
        let good = |v, t| Sample { value: Some(Value::Int(v)), at: at(t), quality: Quality::Good, via: None };
        assert_eq!(
            got,
            vec![(6, vec![("p".to_string(), good(-1, 2))]), (7, vec![("q".to_string(), good(7, 3))])]
        );
        // The raw blocks go to the socket unchanged: still valid (path-less) blocks.
        assert_eq!(s.read_raw_from(0, 10).expect("raw")[1].1, v1(b'q', 3, 7i64.to_be_bytes()));
        assert_eq!(s.append(&batch(1, 0)).expect("append"), 8);
        drop(s);
        let conn = Connection::open(&path).expect("open");
        let version: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION, "marked version 2 so an older build refuses it clearly");
    }

    #[test]
    fn append_read_ack_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir, SpoolLimits::default());
        assert_eq!(s.next_seq(), 1);
        let seqs: Vec<u64> = (0..5).map(|i| s.append(&batch(3, i * 10)).expect("append")).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let p = s.pending();
        assert_eq!((p.batches, p.samples), (5, 15));
        let got = s.read_from(0, 2).expect("read");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (1, batch(3, 0)));
        assert_eq!(got[1], (2, batch(3, 10)));
        let got = s.read_from(3, 100).expect("read");
        assert_eq!(got.iter().map(|b| b.0).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(s.ack(3).expect("ack"), 3);
        assert_eq!(s.read_from(0, 100).expect("read")[0].0, 4);
        assert_eq!(s.ack(3).expect("ack again"), 0);
        assert_eq!(s.ack(5).expect("ack all"), 2);
        assert_eq!(s.pending(), Pending::default());
        assert!(s.read_from(0, 100).expect("read").is_empty());
    }

    #[test]
    fn seq_monotonic_and_data_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = open(&dir, SpoolLimits::default());
            s.append(&batch(2, 0)).expect("append");
            s.append(&batch(2, 1)).expect("append");
            s.append(&batch(2, 2)).expect("append");
            s.ack(1).expect("ack");
            s.set_applied(77).expect("applied");
        }
        let mut s = open(&dir, SpoolLimits::default());
        assert_eq!(s.applied(), 77);
        assert_eq!(s.next_seq(), 4);
        let p = s.pending();
        assert_eq!((p.batches, p.samples), (2, 4));
        assert_eq!(s.read_from(0, 10).expect("read"), vec![(2, batch(2, 1)), (3, batch(2, 2))]);
        // Ack everything, reopen: seqs still continue.
        s.ack(3).expect("ack");
        drop(s);
        let mut s = open(&dir, SpoolLimits::default());
        assert_eq!(s.append(&batch(1, 0)).expect("append"), 4);
        s.set_applied(5).expect("lower applied is ignored");
        assert_eq!(s.applied(), 77);
    }

    #[test]
    fn ack_removes_exactly_upto() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir, SpoolLimits::default());
        for i in 0..10 {
            s.append(&batch(1, i)).expect("append");
        }
        assert_eq!(s.ack(0).expect("ack 0"), 0);
        assert_eq!(s.ack(4).expect("ack"), 4);
        let left: Vec<u64> = s.read_from(0, 100).expect("read").iter().map(|b| b.0).collect();
        assert_eq!(left, [5, 6, 7, 8, 9, 10]);
        assert_eq!(s.pending().batches, 6);
    }

    #[test]
    fn ack_beyond_next_seq_renumbers_after_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir, SpoolLimits::default());
        s.append(&batch(1, 1)).expect("append");
        s.append(&batch(1, 2)).expect("append");
        // The peer says it applied up to 500: our spool file must have been reset.
        assert_eq!(s.ack(500).expect("ack"), 0);
        let got = s.read_from(500, 10).expect("read");
        assert_eq!(got, vec![(501, batch(1, 1)), (502, batch(1, 2))]);
        assert_eq!(s.next_seq(), 503);
        assert_eq!(s.append(&batch(1, 3)).expect("append"), 503);
        drop(s);
        assert_eq!(open(&dir, SpoolLimits::default()).next_seq(), 504);
    }

    #[test]
    fn ack_of_an_impossible_seq_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir, SpoolLimits::default());
        s.append(&batch(1, 1)).expect("append");
        s.append(&batch(1, 2)).expect("append");
        // A peer's Ack or Hello.resume of u64::MAX overflowed the renumbering (a panic,
        // or negative seqs in SQLite).
        for seq in [u64::MAX, i64::MAX as u64, MAX_ACK + 1] {
            assert!(matches!(s.ack(seq), Err(SpoolError::AckRange { seq: got, .. }) if got == seq));
        }
        assert_eq!(s.next_seq(), 3);
        let seqs: Vec<u64> = s.read_from(0, 10).expect("read").iter().map(|b| b.0).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(s.ack(MAX_ACK).expect("largest ack renumbers"), 0);
        assert_eq!(s.next_seq(), MAX_ACK + 3);
    }

    /// Every line written through a `fmt` subscriber while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || w.clone()).finish();
        tracing::subscriber::with_default(sub, f);
        let bytes = buf.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn a_spool_that_stays_full_logs_one_error_not_one_per_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = {
            let mut b = BytesMut::new();
            proto::encode_samples(&batch(10, 0), &mut b).expect("encode");
            b.len() as u64
        };
        let limits = SpoolLimits { max_bytes: one * 3, max_age: Duration::from_secs(3600) };
        let mut s = open(&dir, limits);
        let log = logged(|| {
            for i in 0..50 {
                s.append(&batch(10, i)).expect("append");
            }
        });
        assert_eq!(s.dropped().batches, 47);
        let errors = log.lines().filter(|l| l.contains("ERROR")).count();
        assert_eq!(errors, 1, "{log}");
    }

    #[test]
    fn limits_drop_oldest_and_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = {
            let mut b = BytesMut::new();
            proto::encode_samples(&batch(10, 0), &mut b).expect("encode");
            b.len() as u64
        };
        let limits = SpoolLimits { max_bytes: one * 3, max_age: Duration::from_secs(3600) };
        let mut s = open(&dir, limits);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for i in 0..5 {
            s.append_at(&batch(10, i), t0).expect("append");
        }
        // Only the newest three fit.
        assert_eq!(s.dropped(), Dropped { batches: 2, samples: 20 });
        assert_eq!(s.pending().batches, 3);
        assert_eq!(s.read_from(0, 10).expect("read")[0].0, 3);
        // Age: two hours later every older batch goes, the new one stays.
        s.append_at(&batch(10, 9), t0 + Duration::from_secs(7200)).expect("append");
        assert_eq!(s.dropped(), Dropped { batches: 5, samples: 50 });
        assert_eq!(s.read_from(0, 10).expect("read"), vec![(6, batch(10, 9))]);
        // A single batch larger than max_bytes is kept (it is the newest data).
        s.append_at(&batch(40, 0), t0 + Duration::from_secs(7200)).expect("append");
        assert_eq!(s.pending().batches, 1);
        assert_eq!(s.read_from(0, 10).expect("read")[0].0, 7);
        // Counters persist.
        drop(s);
        assert_eq!(open(&dir, limits).dropped(), Dropped { batches: 6, samples: 60 });
    }

    #[test]
    fn non_sqlite_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage.spool");
        std::fs::write(&path, vec![0x5a; 8192]).expect("write");
        let e = Spool::open(&path, SpoolLimits::default()).expect_err("not a database");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a database"), "{msg}");
    }

    #[test]
    fn empty_append_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir, SpoolLimits::default());
        assert!(matches!(s.append(&[]), Err(SpoolError::Empty { .. })));
        assert_eq!(s.next_seq(), 1);
    }

    #[test]
    fn raw_blocks_are_proto_sample_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir, SpoolLimits::default());
        s.append(&batch(1000, 0)).expect("append 1000");
        let raw = s.read_raw_from(0, 1).expect("raw");
        assert_eq!(proto::samples_count(&raw[0].1).expect("count"), 1000);
        assert_eq!(proto::decode_samples(&raw[0].1).expect("decode"), batch(1000, 0));
    }
}
