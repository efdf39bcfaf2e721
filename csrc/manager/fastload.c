/* The page-table half of HiCacheManager.load(), compiled: resolve the page ids,
 * check every page can be loaded, take device pages and update the table, in
 * one call with no Python object per page.
 *
 * It mirrors HiCacheManager._claim_load (hicache_kernels/manager/manager.py) for
 * the common case only and declines everything else: it returns False, having
 * changed nothing, and the numpy path then does the work or raises the error.
 * It declines when an id is unknown or unhashable, a page is not loadable or
 * still being backed up, an id repeats, the device pool needs an eviction to
 * make room, or the LRU clock needs a rebase.
 *
 * The arrays are the page table's and the allocators' own numpy columns, read
 * through the buffer protocol. A LoadClaimer holds their buffers between calls
 * (taking them costs more than the claim itself) and takes them again when the
 * table replaces a column as it grows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Page-table state bits and allocator states: the values in manager/pages.py. */
enum { DEVICE = 1, HOST = 2, LOADING = 4, BACKING_UP = 8, FETCHING = 16 };
enum { USED = 1 };

/* A column: an attribute of the table or an allocator, held as a buffer. */
typedef struct {
  PyObject* owner;      /* borrowed from the claimer */
  const char* name;
  PyObject* name_obj;   /* interned: attribute lookups by object are the cheap kind */
  Py_ssize_t itemsize;
  int writable;
  PyObject* array;      /* the object whose buffer is held (NULL: none yet) */
  Py_buffer view;
} Column;

enum {
  STATE, HOST_PAGE, DEVICE_PAGE, LOAD_ID, DEVICE_USED, HOST_USED, RAMP,
  STACK, DEVICE_ALLOC_STATE, DEVICE_LOCKS, HOST_LOCKS, NUM_COLUMNS
};

typedef struct {
  PyObject_HEAD
  PyObject* table;
  PyObject* device_alloc;
  PyObject* host_alloc;
  Column columns[NUM_COLUMNS];
} LoadClaimer;

static void drop(Column* c) {
  if (c->array != NULL) {
    PyBuffer_Release(&c->view);
    Py_CLEAR(c->array);
  }
}

/* Hold the current buffer of the column's attribute (a no-op while it is the
 * same object). */
static int refresh(Column* c) {
  PyObject* obj = PyObject_GetAttr(c->owner, c->name_obj);
  if (obj == NULL) return -1;
  if (obj == c->array) {
    Py_DECREF(obj);
    return 0;
  }
  drop(c);
  const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (c->writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(obj, &c->view, flags) < 0) {
    Py_DECREF(obj);
    return -1;
  }
  c->array = obj;   /* owns the reference */
  if (c->view.itemsize != c->itemsize || c->view.ndim != 1) {
    PyErr_Format(PyExc_TypeError, "LoadClaimer: %s must be 1-D with %zd-byte items", c->name,
                 c->itemsize);
    drop(c);
    return -1;
  }
  return 0;
}

static Py_ssize_t length(const Column* c) { return c->view.shape[0]; }

/* Attribute names other than the columns', interned once (PyInit__fastload). */
static PyObject *s_top, *s_clock, *s_index;

static int get_ssize(PyObject* owner, PyObject* name, Py_ssize_t* out) {
  PyObject* obj = PyObject_GetAttr(owner, name);
  if (obj == NULL) return -1;
  *out = PyLong_AsSsize_t(obj);
  Py_DECREF(obj);
  return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int set_ssize(PyObject* owner, PyObject* name, Py_ssize_t value) {
  PyObject* obj = PyLong_FromSsize_t(value);
  if (obj == NULL) return -1;
  int rc = PyObject_SetAttr(owner, name, obj);
  Py_DECREF(obj);
  return rc;
}

static int claimer_init(LoadClaimer* self, PyObject* args, PyObject* kwds) {
  PyObject *table, *device_alloc, *host_alloc;
  static char* kwlist[] = {"table", "device_alloc", "host_alloc", NULL};
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &table, &device_alloc, &host_alloc))
    return -1;
  for (int i = 0; i < NUM_COLUMNS; ++i) drop(&self->columns[i]);
  Py_INCREF(table);
  Py_INCREF(device_alloc);
  Py_INCREF(host_alloc);
  Py_XSETREF(self->table, table);
  Py_XSETREF(self->device_alloc, device_alloc);
  Py_XSETREF(self->host_alloc, host_alloc);
  static const struct { int owner; const char* name; Py_ssize_t itemsize; } spec[NUM_COLUMNS] = {
      {0, "state", 1},        {0, "host_page", 8},  {0, "device_page", 8}, {0, "load_id", 8},
      {0, "device_used", 8},  {0, "host_used", 8},  {0, "_ramp", 8},       {1, "_stack", 8},
      {1, "_state", 1},       {1, "_locks", 4},     {2, "_locks", 4},
  };
  PyObject* owners[3] = {table, device_alloc, host_alloc};
  for (int i = 0; i < NUM_COLUMNS; ++i) {
    Column* c = &self->columns[i];
    c->owner = owners[spec[i].owner];
    c->name = spec[i].name;
    Py_XSETREF(c->name_obj, PyUnicode_InternFromString(spec[i].name));
    if (c->name_obj == NULL) return -1;
    c->itemsize = spec[i].itemsize;
    c->writable = i != RAMP;   /* the LRU ramp is read-only: only its length is used */
    if (refresh(c) < 0) return -1;
  }
  return 0;
}

static void claimer_dealloc(LoadClaimer* self) {
  for (int i = 0; i < NUM_COLUMNS; ++i) {
    drop(&self->columns[i]);
    Py_CLEAR(self->columns[i].name_obj);
  }
  Py_XDECREF(self->table);
  Py_XDECREF(self->device_alloc);
  Py_XDECREF(self->host_alloc);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

#define DECLINE() do { result = Py_False; goto done; } while (0)

/* claim(ids, out, op_id, lock_host) -> bool
 *
 * On True, out[0], out[1], out[2] (an int64 [3, len(ids)] array) hold the rows,
 * host pages and device pages, and the table and allocators are updated exactly
 * as HiCacheManager._claim_load would update them. On False nothing changed. */
static PyObject* claimer_claim(LoadClaimer* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "claim(ids, out, op_id, lock_host)");
    return NULL;
  }
  PyObject *ids = args[0], *out = args[1];
  const long long op_id = PyLong_AsLongLong(args[2]);
  const int lock_host = PyObject_IsTrue(args[3]);
  if ((op_id == -1 && PyErr_Occurred()) || lock_host < 0) return NULL;
  /* A tuple, and every column's buffer held: an id whose hash or equality runs
   * Python code cannot make this call read or write freed memory. */
  if (!PyTuple_CheckExact(ids)) Py_RETURN_FALSE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
  PyObject** items = PySequence_Fast_ITEMS(ids);

  Py_ssize_t top, clock;
  if (get_ssize(self->device_alloc, s_top, &top) < 0 || get_ssize(self->table, s_clock, &clock) < 0)
    return NULL;
  if (n == 0 || n > top) Py_RETURN_FALSE;   /* the device pool must evict first */
  for (int i = 0; i < NUM_COLUMNS; ++i)
    if (refresh(&self->columns[i]) < 0) return NULL;

  PyObject* index = PyObject_GetAttr(self->table, s_index);
  if (index == NULL) return NULL;
  PyObject* result = NULL;
  Py_buffer outv;
  int out_held = 0;
  if (!PyDict_CheckExact(index)) DECLINE();
  if (PyObject_GetBuffer(out, &outv, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
    goto done;
  out_held = 1;
  if (outv.itemsize != 8 || outv.ndim != 2 || outv.shape[0] != 3 || outv.shape[1] != n) {
    PyErr_SetString(PyExc_ValueError, "LoadClaimer.claim: out must be int64 [3, len(ids)]");
    goto done;
  }

  Column* c = self->columns;
  uint8_t* state = c[STATE].view.buf;
  int64_t* host_page = c[HOST_PAGE].view.buf;
  int64_t* device_page = c[DEVICE_PAGE].view.buf;
  int64_t* load_id = c[LOAD_ID].view.buf;
  int64_t* device_used = c[DEVICE_USED].view.buf;
  int64_t* host_used = c[HOST_USED].view.buf;
  int64_t* stack = c[STACK].view.buf;
  uint8_t* alloc_state = c[DEVICE_ALLOC_STATE].view.buf;
  int32_t* device_locks = c[DEVICE_LOCKS].view.buf;
  int32_t* host_locks = c[HOST_LOCKS].view.buf;
  int64_t* rows = outv.buf;
  int64_t* host_pages = rows + n;
  int64_t* device_pages = rows + 2 * n;
  const Py_ssize_t capacity = length(&c[STATE]);
  const Py_ssize_t device_pool = length(&c[DEVICE_LOCKS]);
  const Py_ssize_t host_pool = length(&c[HOST_LOCKS]);
  if (length(&c[HOST_PAGE]) < capacity || length(&c[DEVICE_PAGE]) < capacity ||
      length(&c[LOAD_ID]) < capacity || length(&c[DEVICE_USED]) < capacity ||
      length(&c[HOST_USED]) < capacity || length(&c[STACK]) < top ||
      length(&c[DEVICE_ALLOC_STATE]) < device_pool) {
    PyErr_SetString(PyExc_ValueError, "LoadClaimer: page table columns of different lengths");
    goto done;
  }
  if (clock + n > length(&c[RAMP])) DECLINE();   /* stamps() would rebase the clock */

  /* 1. resolve and check, changing nothing */
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* row = PyDict_GetItemWithError(index, items[i]);   /* borrowed */
    if (row == NULL) {
      PyErr_Clear();          /* unknown or unhashable id: the numpy path says which */
      DECLINE();
    }
    const Py_ssize_t r = PyLong_AsSsize_t(row);
    if (r < 0 || r >= capacity) {
      PyErr_Clear();
      DECLINE();
    }
    const uint8_t s = state[r];
    const int64_t h = host_page[r];
    if ((s & (DEVICE | HOST | FETCHING)) != HOST || (s & BACKING_UP) || h < 0 || h >= host_pool)
      DECLINE();
    rows[i] = r;
  }
  /* 2. place the device pages; loadable rows have none, so finding one means
   *    the row came earlier in this call: undo and decline */
  const Py_ssize_t first = top - n;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    const int64_t page = stack[first + i];
    if (device_page[r] != -1 || page < 0 || page >= device_pool) {
      for (Py_ssize_t j = 0; j < i; ++j) device_page[rows[j]] = -1;
      DECLINE();
    }
    device_page[r] = page;
  }
  /* 3. commit: device pages taken and locked for the load that fills them,
   *    host pages locked while it reads them, the rows loading and most recent */
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    const int64_t page = stack[first + i];
    const int64_t h = host_page[r];
    device_pages[i] = page;
    alloc_state[page] = USED;
    device_locks[page] = 1;
    host_pages[i] = h;
    if (lock_host) host_locks[h] += 1;
    state[r] |= DEVICE | LOADING;
    load_id[r] = op_id;
    device_used[r] = clock + i;
    host_used[r] = clock + i;
  }
  if (set_ssize(self->device_alloc, s_top, first) < 0 || set_ssize(self->table, s_clock, clock + n) < 0)
    goto done;
  result = Py_True;

done:
  if (out_held) PyBuffer_Release(&outv);
  Py_DECREF(index);
  Py_XINCREF(result);
  return result;
}

static PyMethodDef claimer_methods[] = {
    {"claim", (PyCFunction)(void (*)(void))claimer_claim, METH_FASTCALL,
     "claim(ids, out, op_id, lock_host) -> bool: the common case of "
     "HiCacheManager._claim_load; False (nothing changed) otherwise."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoadClaimerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hicache_kernels.manager._fastload.LoadClaimer",
    .tp_basicsize = sizeof(LoadClaimer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "LoadClaimer(table, device_alloc, host_alloc): a load's page-table work, compiled.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)claimer_init,
    .tp_dealloc = (destructor)claimer_dealloc,
    .tp_methods = claimer_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastload", NULL, -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastload(void) {
  s_top = PyUnicode_InternFromString("_top");
  s_clock = PyUnicode_InternFromString("clock");
  s_index = PyUnicode_InternFromString("index");
  if (s_top == NULL || s_clock == NULL || s_index == NULL) return NULL;
  if (PyType_Ready(&LoadClaimerType) < 0) return NULL;
  PyObject* m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  Py_INCREF(&LoadClaimerType);
  if (PyModule_AddObject(m, "LoadClaimer", (PyObject*)&LoadClaimerType) < 0) {
    Py_DECREF(&LoadClaimerType);
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
