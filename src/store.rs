//! The store: the signed op log and the state folded from it, in one redb file.
//!
//! Tables, encodings and versions are documented in `data-schema/redb-tables.md`. In short:
//! `op_log` holds every op envelope by `(origin, seq)`, `heads` the highest seq per origin,
//! `fold_index` every op by its fold position `(hlc, origin, seq)`, `request_ids` the author
//! requests already used (a request takes effect once), `meta` the store schema
//! version, the trust anchor and a digest of the state rows, and one `state_*` table per
//! [`StateTable`] holds the rows [`State::take_changes`] produced.
//!
//! [`Store::submit`] is the ONE path into the log, for local writes and for ops received from other
//! servers alike: it verifies the envelope (signature, canonical bytes, author proof), checks
//! `(origin, seq)` (a duplicate is an idempotent no-op, a gap an error naming the missing seq so a
//! replicator can fetch it), then appends, folds and writes the state rows in ONE write
//! transaction (`Durability::Immediate`: when `submit` returns, the op is on disk).
//!
//! Folding: an op that sorts after the last folded op is applied incrementally. One that sorts
//! earlier (a late arrival from another origin) is folded from a **checkpoint**: the store keeps,
//! in memory, the state at two recent points of the fold (taken every half checkpoint interval,
//! 1024 ops by default) and an undo log of the first pre-image of every state row written since
//! each. A late op that sorts after a checkpoint costs: put the rows back from the undo log, clone
//! the checkpoint's state, replay the ops after it (at most about one interval). One that sorts
//! before both checkpoints (very late, or the first late op after a restart) costs a **full
//! refold**: O(ops in the log) decode + apply (no signature checks: the log only ever holds
//! verified ops) and a rewrite of the state tables. [`Store::submit_batch`] pays either once per
//! batch. Measured in `benches/state_ops.rs` (`late_arrival_*`).
//!
//! Integrity on open: a digest of all state rows is kept in `meta` (updated in O(changed rows)
//! per commit: the wrapping sum of per-row SHA-256). On open the rows are re-digested; a mismatch
//! means the state tables do not match what the fold wrote, and they are rebuilt from the log.
//! [`Store::verify_against_log`] does the full check (refold in memory, compare rows and hash).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use crate::hlc::{DEFAULT_MAX_SKEW_MS, Hlc, SkewError};
use crate::ipam::IpamConfig;
use crate::keys::PublicKey;
use crate::op::{self, AuthorProof, FoldKey, LoggedOp, Op, OpBody, OpError};
use crate::signed::{self, TAG_OP};
use crate::state::{Rejection, RowChange, State, StateDecodeError, StateTable};

/// The store schema version this build writes. Version 0 (log, heads and meta only) is migrated.
pub const STORE_SCHEMA_VERSION: u64 = 1;
/// The oldest store schema version this build can migrate from.
pub const OLDEST_MIGRATABLE_VERSION: u64 = 0;

/// `(origin 32 bytes | seq u64 BE)` → op envelope bytes.
const OP_LOG: TableDefinition<&[u8], &[u8]> = TableDefinition::new("op_log");
/// `origin` (32 bytes) → highest seq (all seqs 1..=head are present).
const HEADS: TableDefinition<&[u8], u64> = TableDefinition::new("heads");
/// fold key (52 bytes, see [`op::FoldKey`]) → empty.
const FOLD_INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("fold_index");
/// author (32 bytes) ‖ request nonce (u64 BE) → fold key of the op that used the author's request.
/// An author's request takes effect at most once: later ops carrying it are replays.
const REQUEST_IDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("request_ids");
/// Store-level facts: see the `META_*` keys.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_SCHEMA: &str = "schema_version"; // u64 BE
const META_ROOT: &str = "root"; // 32 bytes: the trust anchor's public key
const META_ROWS_DIGEST: &str = "state_rows_digest"; // 32 bytes

/// The outcome of submitting one op that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Appended to the log and folded; `Err` if the state refused it (it stays in the log with no
    /// effect, identically on every server).
    Appended {
        origin: PublicKey,
        seq: u64,
        effect: Result<(), NoEffect>,
    },
    /// Already in the log (same bytes): nothing done.
    Duplicate { origin: PublicKey, seq: u64 },
}

/// Why an appended op had no effect (identically on every server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoEffect {
    /// The state refused it (authorization, invariants).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// It carries an author's request that an earlier op (in fold order) already used.
    #[error(
        "author {author}'s request with nonce {nonce} was already used by an earlier op: replay"
    )]
    ReplayedRequest { author: PublicKey, nonce: u64 },
}

/// The id of the author request an op carries: author ‖ nonce.
fn request_id(l: &LoggedOp) -> Option<[u8; 40]> {
    l.author_proof
        .as_ref()
        .map(|p| log_key(&l.op.author, p.nonce))
}

fn replayed(l: &LoggedOp) -> NoEffect {
    let nonce = l.author_proof.as_ref().map(|p| p.nonce).unwrap_or(0);
    NoEffect::ReplayedRequest {
        author: l.op.author,
        nonce,
    }
}

/// Why an op was not appended, or the store could not be used. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("op refused: {0}")]
    Invalid(#[from] OpError),
    #[error(
        "missing seq {missing} from origin {origin} (got seq {got}); fetch the missing ops first"
    )]
    Gap {
        origin: PublicKey,
        missing: u64,
        got: u64,
    },
    #[error("origin {origin} signed two different ops with seq {seq}: equivocation, op refused")]
    Equivocation { origin: PublicKey, seq: u64 },
    #[error("op refused: {0}")]
    Skew(#[from] SkewError),
    #[error(
        "data directory store {path} has schema version {found}; this build supports {OLDEST_MIGRATABLE_VERSION} to {STORE_SCHEMA_VERSION} (older ones are migrated on open). Use a newer lemonade-nexus, or restore a backup"
    )]
    UnsupportedSchema { path: PathBuf, found: u64 },
    #[error("store {path} belongs to the cluster whose root key is {found}, not {expected}")]
    RootMismatch {
        path: PathBuf,
        found: PublicKey,
        expected: PublicKey,
    },
    #[error("no store at {0}; run `lemonade-nexus init` first")]
    Missing(PathBuf),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error("state tables cannot be decoded: {0}")]
    State(#[from] StateDecodeError),
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
}

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
db_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What happened when the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The schema version it was migrated from, if it was.
    pub migrated_from: Option<u64>,
    /// The state tables did not match their digest and were rebuilt from the log.
    pub repaired: bool,
}

/// The op log and folded state in one redb database.
pub struct Store {
    db: Database,
    path: PathBuf,
    root: PublicKey,
    ipam_config: IpamConfig,
    state: State,
    heads: BTreeMap<PublicKey, u64>,
    last_fold: Option<FoldKey>,
    clock: Hlc,
    rows_digest: Digest,
    refolds: u64,
    replays: u64,
    max_skew_ms: u64,
    /// One or two checkpoints, oldest first; the last one's undo log records the current writes.
    checkpoints: Vec<Checkpoint>,
    checkpoint_interval: usize,
}

/// The first pre-image of every state row written since the checkpoint (`None`: it did not exist).
type Undo = BTreeMap<(StateTable, Vec<u8>), Option<Vec<u8>>>;

/// The state at a recent point of the fold, and how to put the tables back to it. A late op that
/// sorts after `key` is folded by restoring this and replaying only the ops after `key`; one that
/// sorts before every checkpoint needs a full refold. The store keeps two, half an interval apart,
/// so the older one always trails the newest op. In memory only: after a restart the first late op
/// older than the restart refolds fully.
struct Checkpoint {
    /// The last op folded into `state` (`None`: before the first op).
    key: Option<FoldKey>,
    state: State,
    undo: Undo,
    /// Request ids first used by ops after `key` (until the next checkpoint).
    requests: Vec<[u8; 40]>,
    /// Ops folded after `key` (until the next checkpoint).
    ops: usize,
}

/// The newest checkpoint: where the current writes are recorded.
fn segment(checkpoints: &mut [Checkpoint]) -> &mut Checkpoint {
    checkpoints
        .last_mut()
        .expect("the store always has a checkpoint")
}

impl Checkpoint {
    fn at(state: &State, key: Option<FoldKey>) -> Checkpoint {
        let mut state = state.clone();
        let _ = state.take_changes(); // already written: the clone starts clean
        Checkpoint {
            key,
            state,
            undo: Undo::new(),
            requests: Vec::new(),
            ops: 0,
        }
    }
}

/// The file name of the database inside the data directory.
pub const DB_FILE: &str = "state.redb";

/// The database path for a data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

impl Store {
    /// Creates a new store (a new cluster state whose trust anchor is `root`) or opens the existing
    /// one, which must belong to the same `root`.
    pub fn create(
        path: &Path,
        root: PublicKey,
        ipam: IpamConfig,
    ) -> Result<(Store, OpenReport), StoreError> {
        let db = Database::create(path)?;
        let found = read_meta_root(&db)?;
        match found {
            Some(found) if found != root => {
                return Err(StoreError::RootMismatch {
                    path: path.into(),
                    found,
                    expected: root,
                });
            }
            Some(_) => {}
            None => {
                let state = State::with_ipam_config(root, ipam).map_err(StoreError::Corrupt)?;
                init_tables(&db, root, state)?;
            }
        }
        Self::finish_open(db, path)
    }

    /// Opens an existing store (refuses to create one).
    pub fn open(path: &Path) -> Result<(Store, OpenReport), StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.into()));
        }
        let db = Database::create(path)?;
        if read_meta_root(&db)?.is_none() {
            return Err(StoreError::Missing(path.into()));
        }
        Self::finish_open(db, path)
    }

    fn finish_open(db: Database, path: &Path) -> Result<(Store, OpenReport), StoreError> {
        let mut report = OpenReport::default();
        let version = read_schema(&db)?;
        if version > STORE_SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema {
                path: path.into(),
                found: version,
            });
        }
        let root = read_meta_root(&db)?
            .ok_or_else(|| StoreError::Corrupt("meta has no root key".into()))?;
        if version < STORE_SCHEMA_VERSION {
            migrate(&db, version, root)?;
            report.migrated_from = Some(version);
        }

        let l = load(&db)?;
        let ipam_config = l.state.ipam().config().clone();
        let checkpoints = vec![Checkpoint::at(&l.state, l.last_fold)];
        let mut store = Store {
            db,
            path: path.into(),
            root,
            ipam_config,
            state: l.state,
            heads: l.heads,
            last_fold: l.last_fold,
            clock: l.clock,
            rows_digest: l.digest,
            refolds: 0,
            replays: 0,
            max_skew_ms: DEFAULT_MAX_SKEW_MS,
            checkpoints,
            checkpoint_interval: 1024,
        };
        let (digest, stored_digest) = (l.digest, l.stored_digest);
        if digest != stored_digest {
            tracing::warn!(path = %path.display(), "state tables do not match their digest; rebuilding them from the op log");
            let tx = store.db.begin_write()?;
            store.refold_in(&tx)?;
            write_digest(&tx, &store.rows_digest)?;
            tx.commit()?;
            report.repaired = true;
        }
        Ok((store, report))
    }

    /// The trust anchor of this cluster.
    pub fn root(&self) -> PublicKey {
        self.root
    }

    /// The folded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The semantic state hash (`State::hash`): equal on every server holding the same ops.
    pub fn state_hash(&self) -> [u8; 32] {
        self.state.hash()
    }

    /// The highest contiguous seq per origin (what anti-entropy compares).
    pub fn heads(&self) -> &BTreeMap<PublicKey, u64> {
        &self.heads
    }

    /// The local HLC (the largest op HLC seen).
    pub fn clock(&self) -> Hlc {
        self.clock
    }

    /// True if an op carrying `author`'s request `nonce` is already in the log (a new op with
    /// that request would be a replay with no effect).
    pub fn request_seen(&self, author: &PublicKey, nonce: u64) -> Result<bool, StoreError> {
        let rtx = self.db.begin_read()?;
        let requests = rtx.open_table(REQUEST_IDS)?;
        Ok(requests.get(&log_key(author, nonce)[..])?.is_some())
    }

    /// How many full refolds (a late op sorting before the checkpoint) this process has done.
    pub fn refolds(&self) -> u64 {
        self.refolds
    }

    /// How many replays from the checkpoint (a late op sorting after it) this process has done.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// Sets how far in the future a received op's HLC may be (default 60 s).
    pub fn set_max_skew_ms(&mut self, ms: u64) {
        self.max_skew_ms = ms;
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Submits one op envelope (local or received) at wall time `now_ms`. See the module docs.
    pub fn submit(&mut self, bytes: &[u8], now_ms: u64) -> Result<Submitted, StoreError> {
        let mut results = self.submit_batch(std::slice::from_ref(&bytes.to_vec()), now_ms)?;
        results.pop().expect("one result per op")
    }

    /// Submits several op envelopes in ONE write transaction (one fsync). Each op gets its own
    /// result; ops are taken in the given order (so a batch may hold consecutive seqs of one origin).
    /// The outer error is a database failure, in which case nothing was committed.
    pub fn submit_batch(
        &mut self,
        ops: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        // Signatures and structure first, outside the transaction.
        let verified: Vec<_> = ops.iter().map(|b| op::verify_op(b)).collect();
        self.submit_verified(verified, now_ms)
    }

    /// [`Store::submit_batch`] after the signature checks.
    fn submit_verified(
        &mut self,
        verified: Vec<Result<op::VerifiedOp, OpError>>,
        now_ms: u64,
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        let tx = self.db.begin_write()?;
        let result = self.submit_in(&tx, verified, now_ms);
        match result {
            Ok(results) => {
                write_digest(&tx, &self.rows_digest)?;
                if let Err(e) = tx.commit() {
                    self.reload()?;
                    return Err(e.into());
                }
                Ok(results)
            }
            Err(e) => {
                drop(tx); // aborts
                self.reload()?;
                Err(e)
            }
        }
    }

    fn submit_in(
        &mut self,
        tx: &WriteTransaction,
        verified: Vec<Result<op::VerifiedOp, OpError>>,
        now_ms: u64,
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        let mut results = Vec::with_capacity(verified.len());
        let mut needs_refold = false;
        // Results of ops appended but not yet folded (they wait for the refold).
        let mut pending: Vec<(usize, FoldKey)> = Vec::new();
        {
            let mut log = tx.open_table(OP_LOG)?;
            let mut heads = tx.open_table(HEADS)?;
            let mut fold = tx.open_table(FOLD_INDEX)?;
            let mut requests = tx.open_table(REQUEST_IDS)?;
            let mut tables = open_state_tables(tx)?;
            for v in verified {
                let v = match v {
                    Ok(v) => v,
                    Err(e) => {
                        results.push(Err(e.into()));
                        continue;
                    }
                };
                let op = &v.logged.op;
                let head = self.heads.get(&op.origin).copied().unwrap_or(0);
                let lkey = log_key(&op.origin, op.seq);
                if op.seq <= head {
                    let same = log.get(&lkey[..])?.map(|b| b.value() == v.bytes.as_slice());
                    results.push(match same {
                        Some(true) => Ok(Submitted::Duplicate {
                            origin: op.origin,
                            seq: op.seq,
                        }),
                        _ => Err(StoreError::Equivocation {
                            origin: op.origin,
                            seq: op.seq,
                        }),
                    });
                    continue;
                }
                if op.seq > head + 1 {
                    results.push(Err(StoreError::Gap {
                        origin: op.origin,
                        missing: head + 1,
                        got: op.seq,
                    }));
                    continue;
                }
                match self.clock.observe(op.hlc, now_ms, self.max_skew_ms) {
                    Ok(c) => self.clock = c,
                    Err(e) => {
                        results.push(Err(e.into()));
                        continue;
                    }
                }
                log.insert(&lkey[..], v.bytes.as_slice())?;
                heads.insert(&op.origin.as_bytes()[..], op.seq)?;
                self.heads.insert(op.origin, op.seq);
                let fk = op.fold_key();
                fold.insert(&fk[..], &[][..])?;
                let sorts_last = self.last_fold.is_none_or(|last| fk > last);
                if !needs_refold && sorts_last {
                    let effect = match request_id(&v.logged) {
                        Some(id) if requests.get(&id[..])?.is_some() => Err(replayed(&v.logged)),
                        id => {
                            if let Some(id) = id {
                                requests.insert(&id[..], &fk[..])?;
                                segment(&mut self.checkpoints).requests.push(id);
                            }
                            self.state.apply(op).map_err(NoEffect::from)
                        }
                    };
                    write_rows(
                        &mut tables,
                        self.state.take_changes(),
                        &mut self.rows_digest,
                        Some(&mut segment(&mut self.checkpoints).undo),
                    )?;
                    self.last_fold = Some(fk);
                    segment(&mut self.checkpoints).ops += 1;
                    self.maybe_advance_checkpoint();
                    results.push(Ok(Submitted::Appended {
                        origin: op.origin,
                        seq: op.seq,
                        effect,
                    }));
                } else {
                    needs_refold = true;
                    pending.push((results.len(), fk));
                    results.push(Ok(Submitted::Duplicate {
                        origin: op.origin,
                        seq: op.seq,
                    })); // placeholder
                }
            }
        }
        if needs_refold {
            let earliest = pending.iter().map(|(_, fk)| *fk).min();
            // The newest checkpoint that every late op sorts after, if any.
            let from = self
                .checkpoints
                .iter()
                .rposition(|c| c.key.is_none_or(|k| earliest.is_some_and(|late| late > k)));
            let effects = match from {
                Some(i) => self.replay_from_checkpoint(tx, i)?,
                None => self.refold_in(tx)?,
            };
            for (i, fk) in pending {
                let effect = effects.get(&fk).cloned().unwrap_or(Ok(()));
                let (origin, seq) = origin_seq_of(&fk);
                results[i] = Ok(Submitted::Appended {
                    origin,
                    seq,
                    effect,
                });
            }
        }
        Ok(results)
    }

    /// Rebuilds the state from the log in fold order inside `tx`, rewrites every state table, and
    /// returns each op's effect by fold key. Also leaves a checkpoint half an interval behind the
    /// newest op (its state cloned on the way), so that the next slightly late op replays only
    /// from there.
    fn refold_in(
        &mut self,
        tx: &WriteTransaction,
    ) -> Result<BTreeMap<FoldKey, Result<(), NoEffect>>, StoreError> {
        self.refolds += 1;
        let mut state = State::with_ipam_config(self.root, self.ipam_config.clone())
            .map_err(StoreError::Corrupt)?;
        let mut effects = BTreeMap::new();
        let mut used: BTreeMap<[u8; 40], FoldKey> = BTreeMap::new();
        let mut tail_requests = Vec::new();
        let mut last = None;
        let mut head: Option<(Vec<RowChange>, State, Option<FoldKey>)> = None;
        let n = {
            let log = tx.open_table(OP_LOG)?;
            let fold = tx.open_table(FOLD_INDEX)?;
            let n = usize::try_from(fold.len()?).unwrap_or(usize::MAX);
            let split = n.saturating_sub(self.checkpoint_interval / 2);
            for (idx, e) in fold.iter()?.enumerate() {
                if idx == split {
                    let rows = state.take_changes();
                    head = Some((rows, state.clone(), last));
                }
                let (k, _) = e?;
                let fk = fold_key(k.value())?;
                let logged = read_logged(&log, &fk)?;
                let effect = match request_id(&logged) {
                    Some(id) if used.contains_key(&id) => Err(replayed(&logged)),
                    id => {
                        if let Some(id) = id {
                            used.insert(id, fk);
                            if idx >= split {
                                tail_requests.push(id);
                            }
                        }
                        state.apply(&logged.op).map_err(NoEffect::from)
                    }
                };
                effects.insert(fk, effect);
                last = Some(fk);
            }
            n
        };
        let (head_rows, cp_state, cp_key) = match head {
            Some(h) => h,
            None => (state.take_changes(), state.clone(), last), // checkpoint at the end
        };
        let tail_rows = state.take_changes();
        write_requests(tx, &used)?;
        for t in StateTable::ALL {
            tx.delete_table(state_def(t))?;
        }
        self.rows_digest = Digest::default();
        let mut tables = open_state_tables(tx)?;
        write_rows(&mut tables, head_rows, &mut self.rows_digest, None)?;
        let mut cp = Checkpoint {
            key: cp_key,
            state: cp_state,
            undo: Undo::new(),
            requests: tail_requests,
            ops: n.min(self.checkpoint_interval / 2),
        };
        // The tail's rows, recording the head's values as the checkpoint's undo log.
        write_rows(
            &mut tables,
            tail_rows,
            &mut self.rows_digest,
            Some(&mut cp.undo),
        )?;
        self.state = state;
        self.last_fold = last;
        self.checkpoints = vec![cp];
        Ok(effects)
    }

    /// Folds again from the checkpoint: puts the state rows and request ids back as they were at
    /// the checkpoint (from the undo log), restarts from the checkpoint's state, and replays every op
    /// after it in fold order. Cost: O(ops and rows changed since the checkpoint), not O(log).
    fn replay_from_checkpoint(
        &mut self,
        tx: &WriteTransaction,
        from: usize,
    ) -> Result<BTreeMap<FoldKey, Result<(), NoEffect>>, StoreError> {
        self.replays += 1;
        let mut tables = open_state_tables(tx)?;
        let mut requests = tx.open_table(REQUEST_IDS)?;
        // 1. Back to checkpoint `from`: undo the newest segment first, so that each row ends with
        //    its oldest pre-image.
        for seg in self.checkpoints[from..].iter_mut().rev() {
            let restore = std::mem::take(&mut seg.undo)
                .into_iter()
                .map(|((table, key), value)| RowChange { table, key, value })
                .collect();
            write_rows(&mut tables, restore, &mut self.rows_digest, None)?;
            for id in seg.requests.drain(..) {
                requests.remove(&id[..])?;
            }
        }
        self.checkpoints.truncate(from + 1);
        let cp = &mut self.checkpoints[from];
        self.state = cp.state.clone();
        cp.ops = 0;
        // 2. Every op after the checkpoint, in fold order (the late ones are in `fold_index` now).
        let log = tx.open_table(OP_LOG)?;
        let fold = tx.open_table(FOLD_INDEX)?;
        let after = cp.key.map(|k| k.to_vec());
        let start = match &after {
            Some(k) => Bound::Excluded(&k[..]),
            None => Bound::Unbounded,
        };
        let mut effects = BTreeMap::new();
        let mut last = cp.key;
        for e in fold.range::<&[u8]>((start, Bound::Unbounded))? {
            let (k, _) = e?;
            let fk = fold_key(k.value())?;
            let logged = read_logged(&log, &fk)?;
            let effect = match request_id(&logged) {
                Some(id) if requests.get(&id[..])?.is_some() => Err(replayed(&logged)),
                id => {
                    if let Some(id) = id {
                        requests.insert(&id[..], &fk[..])?;
                        cp.requests.push(id);
                    }
                    self.state.apply(&logged.op).map_err(NoEffect::from)
                }
            };
            write_rows(
                &mut tables,
                self.state.take_changes(),
                &mut self.rows_digest,
                Some(&mut cp.undo),
            )?;
            effects.insert(fk, effect);
            last = Some(fk);
            cp.ops += 1;
        }
        self.last_fold = last;
        self.maybe_advance_checkpoint();
        Ok(effects)
    }

    /// Starts a new checkpoint at the current state once the newest one is half an interval old,
    /// dropping the oldest beyond two.
    fn maybe_advance_checkpoint(&mut self) {
        if segment(&mut self.checkpoints).ops >= (self.checkpoint_interval / 2).max(1) {
            self.checkpoints
                .push(Checkpoint::at(&self.state, self.last_fold));
            if self.checkpoints.len() > 2 {
                self.checkpoints.remove(0);
            }
        }
    }

    /// The checkpoint spacing, in ops (default 1024; checkpoints are taken every half interval and
    /// two are kept). A late op that sorts after the older checkpoint (at least half an interval
    /// back) costs a replay of at most about this many ops; an older one costs a full refold.
    /// Each checkpoint clones the state.
    pub fn set_checkpoint_interval(&mut self, ops: usize) {
        self.checkpoint_interval = ops.max(1);
    }

    /// Re-reads everything from the database (after a failed transaction).
    fn reload(&mut self) -> Result<(), StoreError> {
        let l = load(&self.db)?;
        self.state = l.state;
        self.heads = l.heads;
        self.last_fold = l.last_fold;
        self.clock = self.clock.max(l.clock);
        self.rows_digest = l.digest;
        self.checkpoints = vec![Checkpoint::at(&self.state, self.last_fold)];
        Ok(())
    }

    /// Appends a local op: assigns the next seq of `origin_key`'s log and a fresh HLC, signs it as
    /// the origin, and submits it like any received op (the same fold and checks; only the
    /// signature this call just made is not verified again).
    /// `author_proof` must be `Some` exactly when `author` is not the origin (see `crate::op`).
    pub fn append_local(
        &mut self,
        origin_key: &crate::identity::NodeKey,
        author: PublicKey,
        body: OpBody,
        author_proof: Option<AuthorProof>,
        now_ms: u64,
    ) -> Result<Submitted, StoreError> {
        let mut r =
            self.append_local_batch(origin_key, vec![(author, body, author_proof)], now_ms)?;
        r.pop().expect("one result per op")
    }

    /// Appends several local ops in one transaction (see [`Store::append_local`]).
    pub fn append_local_batch(
        &mut self,
        origin_key: &crate::identity::NodeKey,
        ops: Vec<(PublicKey, OpBody, Option<AuthorProof>)>,
        now_ms: u64,
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        let origin = origin_key.public();
        let mut seq = self.heads.get(&origin).copied().unwrap_or(0);
        let mut clock = self.clock;
        let verified: Vec<_> = ops
            .into_iter()
            .map(|(author, body, author_proof)| {
                seq += 1;
                clock = clock.tick(now_ms);
                let logged = LoggedOp {
                    op: Op {
                        origin,
                        seq,
                        hlc: clock,
                        author,
                        body,
                    },
                    author_proof,
                };
                let bytes = op::seal_op(origin_key.pair(), &logged);
                // This server's own op, signed just now: checking that signature again would
                // only cost time (a verify is several signs). An author's proof, from a client,
                // is checked like on every other server.
                if logged.author_proof.is_none() && logged.op.author == origin {
                    Ok(op::VerifiedOp { logged, bytes })
                } else {
                    op::verify_op(&bytes)
                }
            })
            .collect();
        self.submit_verified(verified, now_ms)
    }

    /// The op envelopes of `origin` with seq in `from..=to` (for replication and inspection).
    pub fn ops_of(
        &self,
        origin: &PublicKey,
        from: u64,
        to: u64,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let rtx = self.db.begin_read()?;
        let log = rtx.open_table(OP_LOG)?;
        let (a, b) = (log_key(origin, from), log_key(origin, to));
        let mut out = Vec::new();
        for e in log.range(&a[..]..=&b[..])? {
            out.push(e?.1.value().to_vec());
        }
        Ok(out)
    }

    /// Every op in fold order (decoded; for inspection and tests).
    pub fn ops_in_fold_order(&self) -> Result<Vec<Op>, StoreError> {
        let rtx = self.db.begin_read()?;
        let log = rtx.open_table(OP_LOG)?;
        let fold = rtx.open_table(FOLD_INDEX)?;
        let mut out = Vec::new();
        for e in fold.iter()? {
            let (k, _) = e?;
            out.push(read_logged(&log, &fold_key(k.value())?)?.op);
        }
        Ok(out)
    }

    /// Number of ops in the log.
    pub fn op_count(&self) -> Result<u64, StoreError> {
        Ok(self.db.begin_read()?.open_table(OP_LOG)?.len()?)
    }

    /// Every state row as stored, table by table in key order (byte-comparable across servers).
    pub fn state_rows(&self) -> Result<Vec<RowChange>, StoreError> {
        let rtx = self.db.begin_read()?;
        Ok(read_state_rows(&rtx)?.0)
    }

    /// The full check: refolds the log in memory and compares with the stored rows and the loaded
    /// state. Returns the state hash on success.
    pub fn verify_against_log(&self) -> Result<[u8; 32], StoreError> {
        let rtx = self.db.begin_read()?;
        let Folded {
            state: mut fresh,
            requests,
            ..
        } = fold_log(
            &rtx.open_table(OP_LOG)?,
            &rtx.open_table(FOLD_INDEX)?,
            self.root,
            &self.ipam_config,
        )?;
        if requests != read_requests(&rtx)? {
            return Err(StoreError::Corrupt(
                "stored request ids differ from the fold of the log".into(),
            ));
        }
        // A fresh fold reports deletions of rows that never reached a table; keep the live ones.
        let mut expected: Vec<RowChange> = fresh
            .take_changes()
            .into_iter()
            .filter(|r| r.value.is_some())
            .collect();
        expected.sort_by(|a, b| (a.table, &a.key).cmp(&(b.table, &b.key)));
        let stored = read_state_rows(&rtx)?.0;
        if expected != stored {
            return Err(StoreError::Corrupt(
                "stored state rows differ from the fold of the log".into(),
            ));
        }
        if fresh.hash() != self.state.hash() {
            return Err(StoreError::Corrupt(
                "in-memory state differs from the fold of the log".into(),
            ));
        }
        Ok(fresh.hash())
    }
}

/// A read-only view of a store: what the offline admin commands show. Opening it never writes
/// (no migration, no repair), so it is safe next to a running server.
pub struct Snapshot {
    pub root: PublicKey,
    pub state: State,
    pub heads: BTreeMap<PublicKey, u64>,
    pub op_count: u64,
    pub clock: Hlc,
}

impl Snapshot {
    /// Reads the store at `path` without modifying it.
    pub fn read(path: &Path) -> Result<Snapshot, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.into()));
        }
        let db = Database::builder().open_read_only(path).map_err(|e| {
            StoreError::Corrupt(format!(
                "cannot open {} read-only ({e}); if the server crashed, open it once with a writing command (`lemonade-nexus init`) to recover it",
                path.display()
            ))
        })?;
        let version = read_schema(&db)?;
        if version > STORE_SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema {
                path: path.into(),
                found: version,
            });
        }
        if version < STORE_SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} has schema version {version} and needs a migration to {STORE_SCHEMA_VERSION}; run `lemonade-nexus init` once to migrate it",
                path.display()
            )));
        }
        let root = read_meta_root(&db)?
            .ok_or_else(|| StoreError::Corrupt("meta has no root key".into()))?;
        let l = load(&db)?;
        let op_count = db.begin_read()?.open_table(OP_LOG)?.len()?;
        Ok(Snapshot {
            root,
            state: l.state,
            heads: l.heads,
            op_count,
            clock: l.clock,
        })
    }
}

/// What [`load`] reads from a database.
struct Loaded {
    heads: BTreeMap<PublicKey, u64>,
    last_fold: Option<FoldKey>,
    clock: Hlc,
    state: State,
    /// Digest of the rows as read now, and as stored at the last commit.
    digest: Digest,
    stored_digest: Digest,
}

/// Reads heads, fold position and state from a database of the current schema.
fn load(db: &impl ReadableDatabase) -> Result<Loaded, StoreError> {
    let root =
        read_meta_root(db)?.ok_or_else(|| StoreError::Corrupt("meta has no root key".into()))?;
    let rtx = db.begin_read()?;
    let mut heads = BTreeMap::new();
    for e in rtx.open_table(HEADS)?.iter()? {
        let (k, v) = e?;
        heads.insert(key32(k.value())?, v.value());
    }
    let fold = rtx.open_table(FOLD_INDEX)?;
    let last_fold: Option<FoldKey> = match fold.last()? {
        Some((k, _)) => Some(fold_key(k.value())?),
        None => None,
    };
    drop(fold);
    let (rows, digest) = read_state_rows(&rtx)?;
    let stored_digest = rtx
        .open_table(META)?
        .get(META_ROWS_DIGEST)?
        .map(|v| Digest::from_bytes(v.value()))
        .transpose()?
        .unwrap_or_default();
    let clock = last_fold.map(|k| hlc_of(&k)).unwrap_or_default();
    let state = State::from_rows(root, rows)?;
    Ok(Loaded {
        heads,
        last_fold,
        clock,
        state,
        digest,
        stored_digest,
    })
}

/// A fresh fold of the whole log.
struct Folded {
    state: State,
    /// The author requests used, and by which op (the `request_ids` table).
    requests: BTreeMap<[u8; 40], FoldKey>,
}

/// Folds every op of the log in fold order into a fresh state.
fn fold_log(
    log: &impl ReadableTable<&'static [u8], &'static [u8]>,
    fold: &impl ReadableTable<&'static [u8], &'static [u8]>,
    root: PublicKey,
    ipam: &IpamConfig,
) -> Result<Folded, StoreError> {
    let mut state = State::with_ipam_config(root, ipam.clone()).map_err(StoreError::Corrupt)?;
    let mut requests = BTreeMap::new();
    for e in fold.iter()? {
        let (k, _) = e?;
        let fk = fold_key(k.value())?;
        let logged = read_logged(log, &fk)?;
        // A request already used is a replay: no effect. Otherwise apply (refusals have no effect).
        match request_id(&logged) {
            Some(id) if requests.contains_key(&id) => {}
            id => {
                if let Some(id) = id {
                    requests.insert(id, fk);
                }
                let _ = state.apply(&logged.op);
            }
        }
    }
    Ok(Folded { state, requests })
}

/// A fold key read back from the `fold_index` table.
fn fold_key(bytes: &[u8]) -> Result<FoldKey, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("bad fold key".into()))
}

/// Reads and decodes the op at fold key `fk` (bytes from our own log: verified, canonical-checked
/// before they were stored, so neither the signature nor the canonical form is re-checked).
fn read_logged(
    log: &impl ReadableTable<&'static [u8], &'static [u8]>,
    fk: &FoldKey,
) -> Result<LoggedOp, StoreError> {
    let (origin, seq) = origin_seq_of(fk);
    let bytes = log.get(&log_key(&origin, seq)[..])?.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "fold index names op {origin}/{seq}, which is not in the log"
        ))
    })?;
    let env = signed::decode_unverified(bytes.value(), TAG_OP)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    ciborium::de::from_reader_with_recursion_limit(&env.payload[..], 32)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn log_key(origin: &PublicKey, seq: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(origin.as_bytes());
    k[32..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn origin_seq_of(fk: &FoldKey) -> (PublicKey, u64) {
    let origin = PublicKey(fk[12..44].try_into().expect("32 bytes"));
    let seq = u64::from_be_bytes(fk[44..52].try_into().expect("8 bytes"));
    (origin, seq)
}

fn hlc_of(fk: &FoldKey) -> Hlc {
    Hlc {
        wall_ms: u64::from_be_bytes(fk[..8].try_into().expect("8 bytes")),
        logical: u32::from_be_bytes(fk[8..12].try_into().expect("4 bytes")),
    }
}

fn key32(b: &[u8]) -> Result<PublicKey, StoreError> {
    Ok(PublicKey(b.try_into().map_err(|_| {
        StoreError::Corrupt("key is not 32 bytes".into())
    })?))
}

fn state_def(t: StateTable) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

type StateTables<'tx> = Vec<(StateTable, redb::Table<'tx, &'static [u8], &'static [u8]>)>;

fn open_state_tables(tx: &WriteTransaction) -> Result<StateTables<'_>, StoreError> {
    StateTable::ALL
        .iter()
        .map(|&t| Ok((t, tx.open_table(state_def(t))?)))
        .collect()
}

/// Writes row changes and keeps the rows digest in step.
fn write_rows(
    tables: &mut StateTables<'_>,
    rows: Vec<RowChange>,
    digest: &mut Digest,
    mut undo: Option<&mut Undo>,
) -> Result<(), StoreError> {
    for r in rows {
        let (_, table) = tables
            .iter_mut()
            .find(|(t, _)| *t == r.table)
            .expect("every StateTable is open");
        let old = match &r.value {
            Some(v) => {
                digest.add(row_hash(r.table, &r.key, v));
                table
                    .insert(&r.key[..], &v[..])?
                    .map(|g| g.value().to_vec())
            }
            None => table.remove(&r.key[..])?.map(|g| g.value().to_vec()),
        };
        if let Some(old) = &old {
            digest.sub(row_hash(r.table, &r.key, old));
        }
        if let Some(u) = undo.as_deref_mut() {
            // Keep the FIRST pre-image: the row as it was at the checkpoint.
            u.entry((r.table, r.key)).or_insert(old);
        }
    }
    Ok(())
}

fn read_state_rows(rtx: &redb::ReadTransaction) -> Result<(Vec<RowChange>, Digest), StoreError> {
    let mut rows = Vec::new();
    let mut digest = Digest::default();
    for t in StateTable::ALL {
        let table = match rtx.open_table(state_def(t)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        for e in table.iter()? {
            let (k, v) = e?;
            digest.add(row_hash(t, k.value(), v.value()));
            rows.push(RowChange {
                table: t,
                key: k.value().to_vec(),
                value: Some(v.value().to_vec()),
            });
        }
    }
    Ok((rows, digest))
}

/// Replaces the `request_ids` table with `requests`.
fn write_requests(
    tx: &WriteTransaction,
    requests: &BTreeMap<[u8; 40], FoldKey>,
) -> Result<(), StoreError> {
    tx.delete_table(REQUEST_IDS)?;
    let mut t = tx.open_table(REQUEST_IDS)?;
    for (id, fk) in requests {
        t.insert(&id[..], &fk[..])?;
    }
    Ok(())
}

fn read_requests(rtx: &redb::ReadTransaction) -> Result<BTreeMap<[u8; 40], FoldKey>, StoreError> {
    let t = match rtx.open_table(REQUEST_IDS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = BTreeMap::new();
    for e in t.iter()? {
        let (k, v) = e?;
        let bad = || StoreError::Corrupt("bad request_ids row".into());
        out.insert(
            k.value().try_into().map_err(|_| bad())?,
            v.value().try_into().map_err(|_| bad())?,
        );
    }
    Ok(out)
}

fn write_digest(tx: &WriteTransaction, d: &Digest) -> Result<(), StoreError> {
    tx.open_table(META)?
        .insert(META_ROWS_DIGEST, &d.to_bytes()[..])?;
    Ok(())
}

fn read_meta_root(db: &impl ReadableDatabase) -> Result<Option<PublicKey>, StoreError> {
    let rtx = db.begin_read()?;
    let meta = match rtx.open_table(META) {
        Ok(m) => m,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    meta.get(META_ROOT)?.map(|v| key32(v.value())).transpose()
}

fn read_schema(db: &impl ReadableDatabase) -> Result<u64, StoreError> {
    let rtx = db.begin_read()?;
    let meta = rtx.open_table(META)?;
    let v = meta
        .get(META_SCHEMA)?
        .ok_or_else(|| StoreError::Corrupt("meta has no schema_version".into()))?;
    let b: [u8; 8] = v
        .value()
        .try_into()
        .map_err(|_| StoreError::Corrupt("schema_version is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(b))
}

/// Creates every table of a fresh store and writes the genesis state rows.
fn init_tables(db: &Database, root: PublicKey, mut state: State) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        tx.open_table(OP_LOG)?;
        tx.open_table(HEADS)?;
        tx.open_table(FOLD_INDEX)?;
        tx.open_table(REQUEST_IDS)?;
        let mut meta = tx.open_table(META)?;
        meta.insert(META_SCHEMA, &STORE_SCHEMA_VERSION.to_be_bytes()[..])?;
        meta.insert(META_ROOT, &root.as_bytes()[..])?;
    }
    let mut digest = Digest::default();
    {
        let mut tables = open_state_tables(&tx)?;
        write_rows(&mut tables, state.take_changes(), &mut digest, None)?;
    }
    write_digest(&tx, &digest)?;
    tx.commit()?;
    Ok(())
}

/// Migrates a store from `from` to [`STORE_SCHEMA_VERSION`] in one transaction.
///
/// v0 → v1: v0 kept only `op_log`, `heads` and `meta` (schema, root). v1 adds the fold index, the
/// state tables and the rows digest: all are derived from the log, so the migration rebuilds them
/// (with the default IPAM configuration, the only one v0 knew).
fn migrate(db: &Database, from: u64, root: PublicKey) -> Result<(), StoreError> {
    tracing::info!(
        from,
        to = STORE_SCHEMA_VERSION,
        "migrating the store schema"
    );
    let tx = db.begin_write()?;
    if from == 0 {
        {
            let log = tx.open_table(OP_LOG)?;
            let mut fold = tx.open_table(FOLD_INDEX)?;
            for e in log.iter()? {
                let (_, v) = e?;
                let env = signed::decode_unverified(v.value(), TAG_OP)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let logged: LoggedOp = signed::from_cbor_canonical(&env.payload)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                fold.insert(&logged.op.fold_key()[..], &[][..])?;
            }
        }
        let Folded {
            mut state,
            requests,
            ..
        } = {
            let log = tx.open_table(OP_LOG)?;
            let fold = tx.open_table(FOLD_INDEX)?;
            fold_log(&log, &fold, root, &IpamConfig::default())?
        };
        write_requests(&tx, &requests)?;
        let mut digest = Digest::default();
        {
            let mut tables = open_state_tables(&tx)?;
            write_rows(&mut tables, state.take_changes(), &mut digest, None)?;
        }
        write_digest(&tx, &digest)?;
    }
    tx.open_table(META)?
        .insert(META_SCHEMA, &STORE_SCHEMA_VERSION.to_be_bytes()[..])?;
    tx.commit()?;
    Ok(())
}

/// Writes a store in the v0 layout (only `op_log`, `heads`, `meta`): for the migration test and
/// nothing else.
#[doc(hidden)]
pub fn write_v0_layout(path: &Path, root: PublicKey, ops: &[Vec<u8>]) -> Result<(), StoreError> {
    let db = Database::create(path)?;
    let tx = db.begin_write()?;
    {
        let mut log = tx.open_table(OP_LOG)?;
        let mut heads = tx.open_table(HEADS)?;
        let mut meta = tx.open_table(META)?;
        meta.insert(META_SCHEMA, &0u64.to_be_bytes()[..])?;
        meta.insert(META_ROOT, &root.as_bytes()[..])?;
        for b in ops {
            let v = op::verify_op(b)?;
            let op = &v.logged.op;
            log.insert(&log_key(&op.origin, op.seq)[..], &b[..])?;
            let h = heads
                .get(&op.origin.as_bytes()[..])?
                .map(|g| g.value())
                .unwrap_or(0);
            heads.insert(&op.origin.as_bytes()[..], h.max(op.seq))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Sets the stored schema version (for the "newer schema is refused" test).
#[doc(hidden)]
pub fn force_schema_version(path: &Path, version: u64) -> Result<(), StoreError> {
    let db = Database::create(path)?;
    let tx = db.begin_write()?;
    tx.open_table(META)?
        .insert(META_SCHEMA, &version.to_be_bytes()[..])?;
    tx.commit()?;
    Ok(())
}

fn row_hash(t: StateTable, key: &[u8], value: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let name = t.name().as_bytes();
    ctx.update(&(name.len() as u32).to_be_bytes());
    ctx.update(name);
    ctx.update(&(key.len() as u32).to_be_bytes());
    ctx.update(key);
    ctx.update(value);
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// A multiset digest of rows: lane-wise wrapping sum of per-row SHA-256 (order-independent and
/// updatable per row). It detects state tables that drifted from what the fold wrote; it is not a
/// cryptographic commitment (that is `State::hash`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Digest([u64; 4]);

impl Digest {
    fn lanes(h: [u8; 32]) -> [u64; 4] {
        std::array::from_fn(|i| {
            u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        })
    }
    fn add(&mut self, h: [u8; 32]) {
        for (a, b) in self.0.iter_mut().zip(Self::lanes(h)) {
            *a = a.wrapping_add(b);
        }
    }
    fn sub(&mut self, h: [u8; 32]) {
        for (a, b) in self.0.iter_mut().zip(Self::lanes(h)) {
            *a = a.wrapping_sub(b);
        }
    }
    fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }
    fn from_bytes(b: &[u8]) -> Result<Digest, StoreError> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| StoreError::Corrupt("rows digest is not 32 bytes".into()))?;
        Ok(Digest(Self::lanes(arr)))
    }
}
