"""Key-value databases of Datum records: LMDB and LevelDB, as Caffe's db.cpp.

Readers (:func:`open_db`) are read-only and never modify a user's database:

* **LMDB** (the ``lmdb`` package) is opened ``readonly=True, lock=False``:
  Caffe's own databases ship without a ``lock.mdb``, and a read-only folder
  (a shared data set, a CI checkout) must work as it is.  LMDB maps the file
  and trusts it: a ``data.mdb`` shorter than its meta page says (a partial
  download or copy) would crash the process with SIGBUS inside liblmdb, so
  the meta pages are checked first (:func:`check_lmdb_file`).  LMDB keeps no
  checksums, so other damage to the file's pages cannot be detected this way
  (docs/security.md).
* **LevelDB** (the ``plyvel`` package) cannot be opened without writing into
  its folder (a LOCK file, a new log and a new MANIFEST).  netlib therefore
  never opens the user's folder itself: it opens a *private view*, a
  temporary folder holding symbolic links to the immutable table and log
  files and copies of the small CURRENT/MANIFEST files, so any database size
  opens at no copying cost, whether the folder is writable or not.  The view
  is logged and removed when the reader closes (or at exit).

A reader lists its keys once, in the database's (sorted) order, so record
``i`` is ``get(keys[i])``: that is the order of Caffe's cursor, and it lets
the prefetching pipeline address records by index (resume, many workers).

Writers (:func:`create_db`) build the database in a temporary folder beside
the target and rename it into place on :meth:`DatabaseWriter.close`: an
interrupted conversion leaves no database that looks complete.  As with
Caffe's ``db::NEW`` an existing target is an error.
"""
import atexit
import logging
import os
import shutil
import tempfile
import threading

from ..errors import ConfigError, NetlibError, NetlibFileNotFoundError

log = logging.getLogger("netlib")

BACKENDS = ("leveldb", "lmdb")  # DataParameter.DB enum order: LEVELDB = 0, LMDB = 1


class DatabaseError(NetlibError, ValueError):
    """A database that cannot be opened or read; the message names it."""


def backend_name(backend):
    """'lmdb' or 'leveldb' from a name (any case) or the DataParameter.DB enum."""
    if isinstance(backend, int):
        if backend not in (0, 1):
            raise ConfigError("unknown database backend %d (LEVELDB = 0, LMDB = 1)" % backend)
        return BACKENDS[backend]
    name = str(backend).lower()
    if name not in BACKENDS:
        raise ConfigError("unknown database backend %r: use lmdb or leveldb" % (backend,))
    return name


def _import(backend):
    module = {"lmdb": "lmdb", "leveldb": "plyvel"}[backend]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError("reading or writing %s databases needs the %r package: pip install %s "
                          "(or pip install 'netlib[data]')" % ({"lmdb": "LMDB", "leveldb": "LevelDB"}[backend],
                                                               module, module)) from None


# -- readers ---------------------------------------------------------------------------
class Database:
    """A read-only database: ``len(db)``, ``db.keys``, ``db.get(key)``,
    ``db.value(i)`` (record ``i`` in key order), iteration over
    ``(key, value)`` pairs and ``close()``.  Safe to read from many threads."""

    backend = None

    def __init__(self, path):
        self.path = path
        self.keys = []

    def __len__(self):
        return len(self.keys)

    def value(self, index):
        return self.get(self.keys[index])

    def value_view(self, index):
        """Record ``index`` without a copy where the backend allows (LMDB: a
        read-only buffer into the memory map, valid while this reader is
        open; copy what must outlive it).  Other backends return bytes."""
        return self.value(index)

    def __iter__(self):
        for key in self.keys:
            yield key, self.get(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the database (idempotent)."""

    def describe(self):
        return "%s database %s" % ({"lmdb": "LMDB", "leveldb": "LevelDB"}[self.backend], self.path)


_LMDB_ENVS = {}  # real path -> [environment, keys, reference count]
_LMDB_LOCK = threading.Lock()
# Releases that came while the lock was held: garbage collection can run a
# reader's finalizer anywhere, even inside the locked code of another reader
# in the same thread, so close() never blocks on the lock; it leaves the
# release here for whoever holds the lock next.
_LMDB_DEFERRED = []


def _release_lmdb(real, env):
    """Drop one reference to ``env`` (the lock is held)."""
    entry = _LMDB_ENVS.get(real)
    if entry is not None and entry[0] is env:
        entry[2] -= 1
        if entry[2] <= 0:
            del _LMDB_ENVS[real]
            env.close()


def _drain_deferred():
    while _LMDB_DEFERRED:
        _release_lmdb(*_LMDB_DEFERRED.pop())


def check_lmdb_file(path):
    """Refuse an LMDB data file that is shorter than its newest meta page
    says (DatabaseError naming the file), before liblmdb maps it.

    The two meta pages (pages 0 and 1, 64-bit layout) each hold the magic
    0xBEEFC0DE, version 1, the page size (in the free-list database's
    ``md_pad``), the last page number and a transaction id; liblmdb uses the
    valid one with the larger id.  Files whose meta pages are not of that
    layout are left to liblmdb, which refuses them with MDB_INVALID.
    """
    import struct
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(2 * 65536)
    except OSError as exc:
        raise DatabaseError("cannot read LMDB database %s: %s" % (path, exc.strerror or exc)) from None
    metas = []
    for offset in sorted({0} | {p for p in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)}):
        meta = head[offset + 16:offset + 16 + 136]
        if len(meta) < 136:
            break
        magic, version = struct.unpack_from("<II", meta, 0)
        psize = struct.unpack_from("<I", meta, 24)[0]
        last, txnid = struct.unpack_from("<QQ", meta, 120)
        if magic == 0xBEEFC0DE and version == 1 and offset in (0, psize) and 512 <= psize <= 65536:
            metas.append((txnid, last, psize))
    if not metas:
        return
    txnid, last, psize = max(metas)
    need = (last + 1) * psize
    if size < need:
        raise DatabaseError("LMDB database %s is truncated: data.mdb holds %d bytes but its meta page "
                            "(transaction %d) needs %d" % (path, size, txnid, need))


class LMDBDatabase(Database):
    """py-lmdb allows one Environment per file and process, so readers of the
    same database (a train and a test net) share one, reference counted."""

    backend = "lmdb"

    def __init__(self, path):
        super().__init__(path)
        lmdb = _import("lmdb")
        self._real = os.path.realpath(path)
        with _LMDB_LOCK:
            _drain_deferred()
            entry = _LMDB_ENVS.get(self._real)
            if entry is None:
                check_lmdb_file(os.path.join(path, "data.mdb") if os.path.isdir(path) else path)
                try:
                    env = lmdb.open(path, readonly=True, lock=False, readahead=False,
                                    max_readers=512, subdir=os.path.isdir(path))
                    with env.begin(buffers=False) as txn:
                        keys = list(txn.cursor().iternext(keys=True, values=False))
                except lmdb.Error as exc:
                    raise DatabaseError("cannot open LMDB database %s: %s" % (path, exc)) from None
                entry = _LMDB_ENVS[self._real] = [env, keys, 0]
            entry[2] += 1
        self._env, self.keys = entry[0], entry[1]
        self._local = threading.local()

    def _txn(self):
        txn = getattr(self._local, "txn", None)
        if txn is None:
            txn = self._local.txn = self._env.begin(buffers=False)
        return txn

    def get(self, key):
        value = self._txn().get(key)
        if value is None:
            raise DatabaseError("%s: no record with key %r" % (self.describe(), key))
        return value

    def value_view(self, index):
        txn = getattr(self._local, "view_txn", None)
        if txn is None:
            txn = self._local.view_txn = self._env.begin(buffers=True)
        value = txn.get(self.keys[index])
        if value is None:
            raise DatabaseError("%s: no record with key %r" % (self.describe(), self.keys[index]))
        return value

    def close(self):
        env, self._env = getattr(self, "_env", None), None
        if env is None:
            return
        if _LMDB_LOCK.acquire(blocking=False):
            try:
                _drain_deferred()
                _release_lmdb(self._real, env)
            finally:
                _LMDB_LOCK.release()
        else:
            _LMDB_DEFERRED.append((self._real, env))


_VIEWS = set()


def _remove_views():
    for folder in list(_VIEWS):
        shutil.rmtree(folder, ignore_errors=True)
    _VIEWS.clear()


atexit.register(_remove_views)


def _leveldb_view(path):
    """A private folder that LevelDB may write into, over the files of ``path``."""
    view = tempfile.mkdtemp(prefix="netlib-leveldb-")
    _VIEWS.add(view)
    for name in os.listdir(path):
        src = os.path.join(os.path.abspath(path), name)
        if name == "LOCK" or name.startswith("LOG") or not os.path.isfile(src):
            continue
        if name == "CURRENT" or name.startswith("MANIFEST-"):
            shutil.copyfile(src, os.path.join(view, name))  # LevelDB rewrites these
        else:
            os.symlink(src, os.path.join(view, name))  # tables and logs: only ever read
    return view


class LevelDBDatabase(Database):
    backend = "leveldb"

    def __init__(self, path):
        super().__init__(path)
        plyvel = _import("leveldb")
        if not os.path.isfile(os.path.join(path, "CURRENT")):
            raise DatabaseError("%s is not a LevelDB database (no CURRENT file)" % path)
        try:
            self._view = _leveldb_view(path)
        except OSError as exc:
            raise DatabaseError("cannot read LevelDB database %s: %s" % (path, exc)) from None
        log.info("Opening LevelDB %s through a private view %s (the database itself is never written)",
                 path, self._view)
        try:
            self._db = plyvel.DB(self._view, create_if_missing=False, paranoid_checks=False)
        except (plyvel.Error, OSError) as exc:
            self.close()
            raise DatabaseError("cannot open LevelDB database %s: %s" % (path, exc)) from None
        self.keys = list(self._db.iterator(include_value=False))

    def get(self, key):
        value = self._db.get(key)
        if value is None:
            raise DatabaseError("%s: no record with key %r" % (self.describe(), key))
        return value

    def close(self):
        db, self._db = getattr(self, "_db", None), None
        if db is not None:
            db.close()
        view, self._view = getattr(self, "_view", None), None
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
            _VIEWS.discard(view)


def open_db(path, backend="lmdb"):
    """Open the database at ``path`` for reading (see the module docstring).

    Raises NetlibFileNotFoundError when ``path`` does not exist and
    DatabaseError when it is not a readable database of that backend.
    """
    backend = backend_name(backend)
    if not path:
        raise ConfigError("no database path given (data_param.source)")
    if not os.path.exists(path):
        raise NetlibFileNotFoundError("%s database %s not found" % (backend.upper() if backend == "lmdb"
                                                                   else "LevelDB", path))
    return (LMDBDatabase if backend == "lmdb" else LevelDBDatabase)(path)


# -- writers ---------------------------------------------------------------------------
class DatabaseWriter:
    """Write records into a new database; ``put(key, value)`` then ``close()``.

    Records go to a temporary folder beside ``path``; ``commit()`` makes the
    puts so far durable there, and ``close()`` commits and renames the folder
    to ``path``.  ``abort()`` (or an exception inside ``with``) removes it.
    """

    def __init__(self, path, backend="lmdb", map_size=1 << 40):
        self.backend = backend_name(backend)
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise ConfigError("%s already exists; remove it first (Caffe refuses to overwrite a database)"
                              % self.path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix="." + os.path.basename(self.path) + ".", suffix=".partial",
                                     dir=parent)
        self._module = _import(self.backend)
        self.count = 0
        if self.backend == "lmdb":
            # 1 TiB of address space, as Caffe's LMDB_MAP_SIZE; the file only
            # grows as records are written.
            self._env = self._module.open(self._tmp, map_size=int(map_size), subdir=True)
            self._txn = self._env.begin(write=True)
        else:
            self._db = self._module.DB(self._tmp, create_if_missing=True, error_if_exists=False,
                                       write_buffer_size=64 << 20)
            self._batch = self._db.write_batch()

    def put(self, key, value):
        if isinstance(key, str):
            key = key.encode("utf-8")
        if self.backend == "lmdb":
            self._txn.put(key, value)
        else:
            self._batch.put(key, value)
        self.count += 1

    def commit(self):
        """Make the records put so far durable (Caffe commits every 1000)."""
        if self.backend == "lmdb":
            self._txn.commit()
            self._txn = self._env.begin(write=True)
        else:
            self._batch.write()
            self._batch = self._db.write_batch()

    def close(self):
        """Commit, close and move the finished database to ``path``."""
        self.commit()
        if self.backend == "lmdb":
            self._txn.abort()
            self._env.sync(True)
            self._env.close()
            lock = os.path.join(self._tmp, "lock.mdb")
            if os.path.exists(lock):
                os.remove(lock)  # like Caffe's files: data.mdb only
        else:
            self._db.close()
        if os.path.exists(self.path):
            self.abort()
            raise ConfigError("%s appeared while it was being written; nothing was replaced" % self.path)
        os.rename(self._tmp, self.path)
        self._tmp = None

    def abort(self):
        """Drop everything written (the target never appears)."""
        try:
            if self.backend == "lmdb" and self._env is not None:
                self._env.close()
            elif self.backend == "leveldb" and not self._db.closed:
                self._db.close()
        except Exception:  # pragma: no cover - best effort clean-up
            pass
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def create_db(path, backend="lmdb", map_size=1 << 40):
    """A :class:`DatabaseWriter` for a new database at ``path``."""
    return DatabaseWriter(path, backend, map_size)
