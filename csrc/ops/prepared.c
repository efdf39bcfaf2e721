/* The per-call half of a prepared launch (hicache_kernels.ops.launch_prepared),
 * compiled: decide whether both index tensors can go straight to the kernel, then
 * call the CUDA library's hck_copy_prepared, with no Python frame in between. Also
 * the SGLang drop-in's per-call reads (hicache_kernels.sglang): the tensors' part of a
 * plan-cache key, and the direct forms' index checks and page expansion (below).
 *
 * A plain C extension (no torch, no CUDA headers). The tensors are read through
 * torch's DLPack exchange table (``torch.Tensor.__dlpack_c_exchange_api__``: one C
 * call per tensor fills a DLTensor on the stack, no Python object made) where this
 * torch has one, else through the tensors' Python methods; both give the answers
 * ops.launch_prepared gives when this module is not built (tests run all three on
 * the same calls). The library's function comes as an address from ctypes.
 *
 *   setup(tensor_type, int64, flags, exchange, storage_id, empty)   once: torch.Tensor,
 *       torch.int64, the dict holding ``_enabled`` (NVTX ranges on: every call
 *       declines), the exchange table's capsule or None (the methods then), the
 *       function giving a tensor's storage address (or None) and torch.empty
 *   Launch(fn, descs, n_descs, index, dl_device, raw_stream, current, error, keep)
 *       one prepared launch; ``launch(src, dst[, stream[, check[, events]]])``
 *       -> True | False, and its ``on_launch`` (None or called after each launch)
 *
 * True: launched. False: declined, nothing done: a bounds check asked for
 * (``check`` true), NVTX ranges on, an index tensor not exactly a torch.Tensor of
 * dtype int64, 1-D and contiguous, on device ``index`` (-1: the CPU; ``dl_device``,
 * (DLPack device type, id), is the same device as DLPack names it), or the two of
 * different lengths; the checked path then takes the call. A library error calls
 * ``error(rc)``, which raises. The stream: ``current(index)`` for None where
 * ``current`` is given, else ``raw_stream(stream)``. With a stream passed and a
 * device (index >= 0), both index tensors are recorded on it (``record_stream``),
 * so that their memory is not reused before the stream has read them. ``events`` is
 * None or a buffer of n_descs raw event handles (a ctypes array). The GIL is
 * released around the library call; ``keep`` (the descriptions and what they point
 * to) lives as long as the Launch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int (*copy_prepared_fn)(const void* descs, int64_t n_descs, const int64_t* src_indices,
                                const int64_t* dst_indices, int64_t n_items, void* stream,
                                void* const* events);

/* DLPack's structs (dlpack.h, v1.x: the layout of its stable part), declared here
 * so that no framework header is needed. */
typedef struct {
  int32_t device_type;
  int32_t device_id;
} DLDevice;
typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;
typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;
typedef struct DLPackExchangeAPIHeader {
  DLPackVersion version;
  struct DLPackExchangeAPIHeader* prev_api;
} DLPackExchangeAPIHeader;
typedef struct {
  DLPackExchangeAPIHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, DLTensor* out);
  void* current_work_stream;
} DLPackExchangeAPI;
enum { DL_INT = 0 };

static PyObject *s_dtype, *s_shape, *s_is_contiguous, *s_get_device, *s_data_ptr, *s_record_stream,
    *s_enabled;
static PyObject *g_tensor_type, *g_int64, *g_flags, *g_exchange_capsule, *g_storage_id, *g_empty,
    *g_dtype_kw;
static int (*g_to_dltensor)(void*, DLTensor*); /* NULL: ask the Python methods */

/* A method's int result; -1 with no exception set is a valid answer, so errors
 * are reported through *ok. */
static long long call_int(PyObject* t, PyObject* name, int* ok) {
  PyObject* r = PyObject_CallMethodNoArgs(t, name);
  if (r == NULL) {
    *ok = 0;
    return 0;
  }
  const long long v = PyLong_AsLongLong(r);
  Py_DECREF(r);
  if (v == -1 && PyErr_Occurred()) *ok = 0;
  return v;
}

/* 1 when ``t`` (exactly a torch.Tensor) can go straight to the kernel, with its
 * address and length, read through DLPack's exchange table. */
static int usable_dlpack(PyObject* t, const DLDevice* device, int64_t* address, int64_t* length) {
  DLTensor dl;
  if (g_to_dltensor(t, &dl) != 0) return 0;
  if (dl.dtype.code != DL_INT || dl.dtype.bits != 64 || dl.dtype.lanes != 1 || dl.ndim != 1 ||
      dl.device.device_type != device->device_type || dl.device.device_id != device->device_id)
    return 0;
  const int64_t n = dl.shape[0];
  if (n > 1 && dl.strides != NULL && dl.strides[0] != 1) return 0;
  *length = n;
  *address = (int64_t)(intptr_t)dl.data + (int64_t)dl.byte_offset;
  return 1;
}

/* The same answer through the tensor's Python methods (a torch without the table). */
static int usable_methods(PyObject* t, long long index, int64_t* address, int64_t* length) {
  PyObject* dtype = PyObject_GetAttr(t, s_dtype);
  if (dtype == NULL) return 0;
  const int int64 = dtype == g_int64;
  Py_DECREF(dtype);
  if (!int64) return 0;
  PyObject* shape = PyObject_GetAttr(t, s_shape);
  if (shape == NULL) return 0;
  int ok = PyTuple_Check(shape) && PyTuple_GET_SIZE(shape) == 1;
  const long long n = ok ? PyLong_AsLongLong(PyTuple_GET_ITEM(shape, 0)) : 0;
  Py_DECREF(shape);
  if (!ok || (n == -1 && PyErr_Occurred())) return 0;
  PyObject* contiguous = PyObject_CallMethodNoArgs(t, s_is_contiguous);
  if (contiguous == NULL) return 0;
  ok = contiguous == Py_True;
  Py_DECREF(contiguous);
  if (!ok) return 0;
  if (call_int(t, s_get_device, &ok) != index || !ok) return 0;
  *length = n;
  *address = call_int(t, s_data_ptr, &ok);
  return ok;
}

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  copy_prepared_fn fn;
  const void* descs;
  long long n_descs;
  long long index;
  int has_dl_device;
  DLDevice dl_device;
  PyObject* index_obj;
  PyObject* raw_stream;
  PyObject* current;
  PyObject* error;
  PyObject* keep;
  PyObject* on_launch;
} Launch;

static int usable(Launch* self, PyObject* t, int64_t* address, int64_t* length) {
  if ((PyObject*)Py_TYPE(t) != g_tensor_type) return 0;
  if (g_to_dltensor != NULL && self->has_dl_device) return usable_dlpack(t, &self->dl_device, address, length);
  return usable_methods(t, self->index, address, length);
}

/* The cudaStream_t to launch on, or -1 with an exception set (handles are never -1). */
static int stream_handle(Launch* self, PyObject* stream, void** out) {
  PyObject* r = stream == Py_None && self->current != Py_None
                    ? PyObject_CallOneArg(self->current, self->index_obj)
                    : PyObject_CallOneArg(self->raw_stream, stream);
  if (r == NULL) return -1;
  *out = r == Py_None ? NULL : PyLong_AsVoidPtr(r);
  Py_DECREF(r);
  return PyErr_Occurred() ? -1 : 0;
}

static PyObject* launch_call(PyObject* obj, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  Launch* self = (Launch*)obj;
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs < 2 || nargs > 5 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
    PyErr_SetString(PyExc_TypeError, "launch(src, dst, stream=None, check=None, events=None): "
                                     "positional arguments only");
    return NULL;
  }
  PyObject* stream = nargs > 2 ? args[2] : Py_None;
  PyObject* check = nargs > 3 ? args[3] : Py_None;
  PyObject* events_obj = nargs > 4 ? args[4] : Py_None;
  if (check != Py_None) {
    const int asked = PyObject_IsTrue(check);
    if (asked < 0) return NULL;
    if (asked) Py_RETURN_FALSE;
  }
  PyObject* nvtx = PyDict_GetItemWithError(g_flags, s_enabled); /* borrowed */
  if (nvtx != NULL) {
    const int on = PyObject_IsTrue(nvtx);
    if (on < 0) return NULL;
    if (on) Py_RETURN_FALSE;
  } else if (PyErr_Occurred()) {
    return NULL;
  }
  int64_t src, dst, n_src, n_dst;
  if (!usable(self, args[0], &src, &n_src) || !usable(self, args[1], &dst, &n_dst) || n_src != n_dst) {
    PyErr_Clear(); /* a tensor whose reads raise (sparse, nested): the checked path names it */
    Py_RETURN_FALSE;
  }
  void* raw = NULL;
  if (stream_handle(self, stream, &raw) < 0) return NULL;
  Py_buffer events;
  int held = 0;
  if (events_obj != Py_None) {
    if (PyObject_GetBuffer(events_obj, &events, PyBUF_SIMPLE) < 0) return NULL;
    held = 1;
    if (events.len < (Py_ssize_t)(self->n_descs * (long long)sizeof(void*))) {
      PyBuffer_Release(&events);
      PyErr_Format(PyExc_ValueError, "events: expected %lld event handles", self->n_descs);
      return NULL;
    }
  }
  int rc;
  const copy_prepared_fn fn = self->fn;
  const void* descs = self->descs;
  const long long n_descs = self->n_descs;
  Py_BEGIN_ALLOW_THREADS
  rc = fn(descs, n_descs, (const int64_t*)(intptr_t)src, (const int64_t*)(intptr_t)dst, n_src, raw,
          held ? (void* const*)events.buf : NULL);
  Py_END_ALLOW_THREADS
  if (held) PyBuffer_Release(&events);
  if (rc != 0) {
    PyObject* code = PyLong_FromLong(rc);
    if (code == NULL) return NULL;
    PyObject* r = PyObject_CallOneArg(self->error, code); /* raises, naming the transfer */
    Py_DECREF(code);
    if (r != NULL) {
      Py_DECREF(r);
      PyErr_Format(PyExc_RuntimeError, "the CUDA library returned error %d", rc);
    }
    return NULL;
  }
  if (stream != Py_None && self->index >= 0) {
    for (int i = 0; i < 2; i++) {
      PyObject* r = PyObject_CallMethodOneArg(args[i], s_record_stream, stream);
      if (r == NULL) return NULL;
      Py_DECREF(r);
    }
  }
  if (self->on_launch != Py_None) {
    PyObject* r = PyObject_CallNoArgs(self->on_launch);
    if (r == NULL) return NULL;
    Py_DECREF(r);
  }
  Py_RETURN_TRUE;
}

static PyObject* launch_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  PyObject *fn, *descs, *dl_device, *raw_stream, *current, *error, *keep;
  long long n_descs, index;
  if (!PyArg_ParseTuple(args, "OOLLOOOOO:Launch", &fn, &descs, &n_descs, &index, &dl_device,
                        &raw_stream, &current, &error, &keep))
    return NULL;
  if (g_tensor_type == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Launch: setup(...) first");
    return NULL;
  }
  void* fn_ptr = PyLong_AsVoidPtr(fn);
  void* descs_ptr = PyLong_AsVoidPtr(descs);
  if (PyErr_Occurred()) return NULL;
  if (fn_ptr == NULL || descs_ptr == NULL || n_descs < 1) {
    PyErr_SetString(PyExc_ValueError, "Launch: expected a function, descriptions and n_descs >= 1");
    return NULL;
  }
  if (!PyCallable_Check(raw_stream) || !PyCallable_Check(error) ||
      (current != Py_None && !PyCallable_Check(current))) {
    PyErr_SetString(PyExc_TypeError, "Launch: raw_stream and error must be callables, current one or None");
    return NULL;
  }
  int has_dl = 0;
  int dl_type = 0, dl_id = 0;
  if (dl_device != Py_None) {
    if (!PyArg_ParseTuple(dl_device, "ii:dl_device", &dl_type, &dl_id)) return NULL;
    has_dl = 1;
  }
  Launch* self = (Launch*)type->tp_alloc(type, 0);
  if (self == NULL) return NULL;
  self->vectorcall = launch_call;
  self->fn = (copy_prepared_fn)fn_ptr;
  self->descs = descs_ptr;
  self->n_descs = n_descs;
  self->index = index;
  self->has_dl_device = has_dl;
  self->dl_device.device_type = dl_type;
  self->dl_device.device_id = dl_id;
  self->index_obj = PyLong_FromLongLong(index);
  if (self->index_obj == NULL) {
    Py_DECREF(self);
    return NULL;
  }
  self->raw_stream = Py_NewRef(raw_stream);
  self->current = Py_NewRef(current);
  self->error = Py_NewRef(error);
  self->keep = Py_NewRef(keep);
  self->on_launch = Py_NewRef(Py_None);
  return (PyObject*)self;
}

static int launch_traverse(Launch* self, visitproc visit, void* arg) {
  Py_VISIT(self->raw_stream);
  Py_VISIT(self->current);
  Py_VISIT(self->error);
  Py_VISIT(self->keep);
  Py_VISIT(self->on_launch);
  return 0;
}

static int launch_clear(Launch* self) {
  Py_CLEAR(self->index_obj);
  Py_CLEAR(self->raw_stream);
  Py_CLEAR(self->current);
  Py_CLEAR(self->error);
  Py_CLEAR(self->keep);
  Py_CLEAR(self->on_launch);
  return 0;
}

static void launch_dealloc(Launch* self) {
  PyObject_GC_UnTrack(self);
  launch_clear(self);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

static PyObject* launch_get_on_launch(Launch* self, void* closure) { return Py_NewRef(self->on_launch); }

static int launch_set_on_launch(Launch* self, PyObject* value, void* closure) {
  if (value == NULL || (value != Py_None && !PyCallable_Check(value))) {
    PyErr_SetString(PyExc_TypeError, "on_launch: expected a callable or None");
    return -1;
  }
  Py_SETREF(self->on_launch, Py_NewRef(value));
  return 0;
}

static PyGetSetDef launch_getset[] = {
    {"on_launch", (getter)launch_get_on_launch, (setter)launch_set_on_launch,
     "None, or called with no arguments after each launch", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaunchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hicache_kernels._prepared.Launch",
    .tp_basicsize = sizeof(Launch),
    .tp_dealloc = (destructor)launch_dealloc,
    .tp_vectorcall_offset = offsetof(Launch, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Launch(fn, descs, n_descs, index, dl_device, raw_stream, current, error, keep): "
              "launch(src, dst, stream=None, check=None, events=None) -> True | False",
    .tp_traverse = (traverseproc)launch_traverse,
    .tp_clear = (inquiry)launch_clear,
    .tp_getset = launch_getset,
    .tp_new = launch_new,
};

/* -- plan-cache keys ------------------------------------------------------------------
 *
 * tensor_key(tensors) -> Key | None: what names each tensor of a list (or tuple) for
 * the drop-in's plan cache, read in C: its allocation (the address of its storage,
 * from ``storage_id``), its address, device, dtype, shape and strides. A Key hashes
 * and compares by those numbers. None (the caller builds its key in Python) when an
 * element is not exactly a torch.Tensor or cannot be read here.
 */

typedef struct {
  PyObject_VAR_HEAD
  Py_hash_t hash;
  int64_t words[1];
} Key;

static Py_hash_t key_hash(Key* self) { return self->hash; }

static PyTypeObject KeyType;

static PyObject* key_richcompare(PyObject* a, PyObject* b, int op) {
  if ((op != Py_EQ && op != Py_NE) || Py_TYPE(a) != &KeyType || Py_TYPE(b) != &KeyType)
    Py_RETURN_NOTIMPLEMENTED;
  const Key* x = (const Key*)a;
  const Key* y = (const Key*)b;
  const int same = Py_SIZE(x) == Py_SIZE(y) && x->hash == y->hash &&
                   memcmp(x->words, y->words, (size_t)Py_SIZE(x) * sizeof(int64_t)) == 0;
  return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static PyTypeObject KeyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hicache_kernels._prepared.Key",
    .tp_basicsize = offsetof(Key, words),
    .tp_itemsize = sizeof(int64_t),
    .tp_hash = (hashfunc)key_hash,
    .tp_richcompare = key_richcompare,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "What names a list of tensors in the plan cache (see tensor_key).",
};

/* Reads ``t`` (exactly a torch.Tensor) through DLPack's table: 1, or 0 with no
 * exception left set. */
static int read_tensor(PyObject* t, DLTensor* dl) {
  if ((PyObject*)Py_TYPE(t) != g_tensor_type || g_to_dltensor(t, dl) != 0) {
    PyErr_Clear();
    return 0;
  }
  return 1;
}

static PyObject* tensor_key(PyObject* self, PyObject* tensors) {
  if (g_to_dltensor == NULL || g_storage_id == Py_None) Py_RETURN_NONE;
  PyObject* seq = PySequence_Fast(tensors, "tensor_key: expected a list or tuple of tensors");
  if (seq == NULL) return NULL;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  int64_t local[1024];
  int64_t* buf = local;
  Py_ssize_t capacity = 1024, used = 0;
  PyObject* key = NULL;
  DLTensor dl;
  for (Py_ssize_t i = 0; i < n; i++) {
    if (!read_tensor(items[i], &dl) || dl.ndim < 0 || (dl.ndim > 0 && dl.strides == NULL)) goto none;
    const Py_ssize_t need = used + 4 + 2 * (Py_ssize_t)dl.ndim;
    if (need > capacity) {
      capacity = 2 * need;
      int64_t* grown = PyMem_Malloc((size_t)capacity * sizeof(int64_t));
      if (grown == NULL) {
        PyErr_NoMemory();
        goto done;
      }
      memcpy(grown, buf, (size_t)used * sizeof(int64_t));
      if (buf != local) PyMem_Free(buf);
      buf = grown;
    }
    int64_t* w = buf + used;
    /* the DLTensor's shape and strides are the tensor's own: copied before Python runs */
    w[2] = ((int64_t)dl.device.device_type << 32) | (uint32_t)dl.device.device_id;
    w[3] = ((int64_t)dl.ndim << 32) | ((int64_t)dl.dtype.lanes << 16) | ((int64_t)dl.dtype.bits << 8) |
           dl.dtype.code;
    w[1] = (int64_t)(intptr_t)dl.data + (int64_t)dl.byte_offset;
    for (int d = 0; d < dl.ndim; d++) {
      w[4 + d] = dl.shape[d];
      w[4 + dl.ndim + d] = dl.strides[d];
    }
    PyObject* storage = PyObject_CallOneArg(g_storage_id, items[i]);
    if (storage == NULL) goto none;
    w[0] = (int64_t)PyLong_AsUnsignedLongLong(storage);
    Py_DECREF(storage);
    if (PyErr_Occurred()) goto none;
    used = need;
  }
  key = (PyObject*)PyObject_NewVar(Key, &KeyType, used > 0 ? used : 1);
  if (key == NULL) goto done;
  Py_SET_SIZE(key, used);
  memcpy(((Key*)key)->words, buf, (size_t)used * sizeof(int64_t));
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)used;
  for (Py_ssize_t i = 0; i < used; i++) {
    h ^= (uint64_t)buf[i];
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  }
  ((Key*)key)->hash = (Py_hash_t)h == -1 ? -2 : (Py_hash_t)h;
  goto done;
none: /* not named here: the caller builds its key in Python */
  PyErr_Clear();
  key = Py_NewRef(Py_None);
done:
  if (buf != local) PyMem_Free(buf);
  Py_DECREF(seq);
  return key;
}

/* -- the direct forms' indices --------------------------------------------------------
 *
 * direct_indices(src, dst, page_size, src_mode, dst_mode, outs)
 *     -> (src, dst, src_largest, dst_largest) | None
 *
 * For exactly torch.Tensors of int64, 1-D and contiguous, in CPU memory, of one
 * length that is a multiple of page_size >= 1; None otherwise (the caller's checks
 * then name what is wrong). Per side, mode 0 keeps the indices as they are (the same
 * tensor comes back); mode 1 expands each page's first index to the whole page that
 * holds it, and mode 2 to the page_size slots that start there (SGLang copies whole
 * pages): new tensors, or ``outs`` (two int64 CPU tensors of that length) written
 * over, where a negative first index makes every slot of its page negative (skipped). ``*_largest`` is the largest index of the result (what a
 * bounds check compares), None when there are none. checked_pages(src, dst,
 * page_size) says whether direct_indices takes them, reading no index.
 */

static int read_indices(PyObject* t, const int64_t** data, int64_t* n) {
  DLTensor dl;
  if (!read_tensor(t, &dl) || dl.dtype.code != DL_INT || dl.dtype.bits != 64 || dl.dtype.lanes != 1 ||
      dl.ndim != 1 || dl.device.device_type != 1 /* kDLCPU */)
    return 0;
  if (dl.shape[0] > 1 && dl.strides != NULL && dl.strides[0] != 1) return 0;
  *data = (const int64_t*)((const char*)dl.data + dl.byte_offset);
  *n = dl.shape[0];
  return 1;
}

static PyObject* new_indices(int64_t n, int64_t** data) {
  PyObject* size = PyLong_FromLongLong(n);
  if (size == NULL) return NULL;
  PyObject* args[2] = {size, g_int64};
  PyObject* t = PyObject_Vectorcall(g_empty, args, 1, g_dtype_kw);
  Py_DECREF(size);
  if (t == NULL) return NULL;
  DLTensor dl;
  if (!read_tensor(t, &dl) || dl.ndim != 1 || dl.shape[0] != n) {
    Py_DECREF(t);
    PyErr_SetString(PyExc_RuntimeError, "direct_indices: torch.empty gave an unreadable tensor");
    return NULL;
  }
  *data = (int64_t*)((char*)dl.data + dl.byte_offset);
  return t;
}

/* One side: the result (a new reference) and its largest index (INT64_MIN: none);
 * Py_None (a new reference) when a page would run past INT64_MAX. */
static PyObject* one_side(PyObject* given, const int64_t* in, int64_t n, int64_t page_size, int mode,
                          PyObject* into, int64_t* largest) {
  int64_t top = INT64_MIN;
  if (mode == 0) { /* four running maxima: no branch to mispredict, four compares in flight */
    int64_t m[4] = {INT64_MIN, INT64_MIN, INT64_MIN, INT64_MIN};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (int k = 0; k < 4; k++) m[k] = in[i + k] > m[k] ? in[i + k] : m[k];
    for (; i < n; i++) m[0] = in[i] > m[0] ? in[i] : m[0];
    for (int k = 0; k < 4; k++) top = m[k] > top ? m[k] : top;
    *largest = top;
    return Py_NewRef(given);
  }
  int64_t* out;
  PyObject* t;
  if (into != NULL) { /* checked by the caller: its length, apart from every other array */
    const int64_t* at;
    int64_t length;
    if (!read_indices(into, &at, &length)) return NULL;
    out = (int64_t*)at;
    t = Py_NewRef(into);
  } else {
    t = new_indices(n, &out);
    if (t == NULL) return NULL;
  }
  for (int64_t p = 0; p < n; p += page_size) {
    int64_t start = in[p];
    if (mode == 1) { /* the page holding it: floor division, so -1 becomes -page_size */
      const int64_t q = start / page_size;
      start = (q - (start % page_size < 0)) * page_size;
    } else if (start < 0) {
      start = -page_size;
    }
    if (start > INT64_MAX - page_size) {
      Py_DECREF(t);
      Py_RETURN_NONE;
    }
    for (int64_t j = 0; j < page_size; j++) out[p + j] = start + j;
    if (start + page_size - 1 > top) top = start + page_size - 1;
  }
  *largest = top;
  return t;
}

static PyObject* largest_or_none(int64_t top) {
  return top == INT64_MIN ? Py_NewRef(Py_None) : PyLong_FromLongLong(top);
}

/* checked_pages(src, dst, page_size) -> bool: whether direct_indices takes them. */
static int pages_checked(PyObject* const* args, const int64_t** src, const int64_t** dst, int64_t* n,
                         long long* page_size) {
  int64_t n_dst;
  *page_size = PyLong_CheckExact(args[2]) ? PyLong_AsLongLong(args[2]) : 0;
  if (*page_size == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return 0;
  }
  return g_to_dltensor != NULL && *page_size >= 1 && read_indices(args[0], src, n) &&
         read_indices(args[1], dst, &n_dst) && *n == n_dst && *n % *page_size == 0;
}

static PyObject* checked_pages(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "checked_pages(src, dst, page_size)");
    return NULL;
  }
  const int64_t *src, *dst;
  int64_t n;
  long long page_size;
  return PyBool_FromLong(pages_checked(args, &src, &dst, &n, &page_size));
}

static PyObject* direct_indices(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "direct_indices(src, dst, page_size, src_mode, dst_mode, outs)");
    return NULL;
  }
  PyObject* outs = args[5];
  if (outs != Py_None && (!PyTuple_Check(outs) || PyTuple_GET_SIZE(outs) != 2)) {
    PyErr_SetString(PyExc_TypeError, "direct_indices: outs is None or (src_out, dst_out)");
    return NULL;
  }
  const long src_mode = PyLong_AsLong(args[3]);
  const long dst_mode = PyLong_AsLong(args[4]);
  if (PyErr_Occurred()) return NULL;
  if (src_mode < 0 || src_mode > 2 || dst_mode < 0 || dst_mode > 2) {
    PyErr_SetString(PyExc_ValueError, "direct_indices: modes are 0, 1 or 2");
    return NULL;
  }
  const int64_t *src, *dst;
  int64_t n;
  long long page_size;
  if (!pages_checked(args, &src, &dst, &n, &page_size)) Py_RETURN_NONE;
  if (outs != Py_None) { /* four arrays of n that must not overlap: written while read */
    const int64_t* at[4] = {src, dst, NULL, NULL};
    for (int i = 0; i < 2; i++) {
      int64_t length;
      if (!read_indices(PyTuple_GET_ITEM(outs, i), &at[2 + i], &length) || length != n) {
        PyErr_SetString(PyExc_ValueError, "direct_indices: expected outs of two int64 CPU tensors "
                                          "as long as the indices");
        return NULL;
      }
    }
    for (int i = 0; i < 4; i++)
      for (int j = i + 1; j < 4; j++)
        if (i >= 2 || j >= 2) {
          if (n > 0 && at[i] < at[j] + n && at[j] < at[i] + n) {
            PyErr_SetString(PyExc_ValueError, "direct_indices: outs overlap the indices or each other");
            return NULL;
          }
        }
  }
  int64_t src_top, dst_top;
  PyObject* src_out = one_side(args[0], src, n, page_size, (int)src_mode,
                               outs == Py_None ? NULL : PyTuple_GET_ITEM(outs, 0), &src_top);
  if (src_out == NULL) return NULL;
  PyObject* dst_out = one_side(args[1], dst, n, page_size, (int)dst_mode,
                               outs == Py_None ? NULL : PyTuple_GET_ITEM(outs, 1), &dst_top);
  if (dst_out == NULL || src_out == Py_None || dst_out == Py_None) {
    Py_DECREF(src_out);
    if (dst_out == NULL) return NULL;
    Py_DECREF(dst_out);
    Py_RETURN_NONE;
  }
  PyObject* a = largest_or_none(src_top);
  PyObject* b = a == NULL ? NULL : largest_or_none(dst_top);
  if (b == NULL) {
    Py_XDECREF(a);
    Py_DECREF(src_out);
    Py_DECREF(dst_out);
    return NULL;
  }
  PyObject* r = PyTuple_Pack(4, src_out, dst_out, a, b);
  Py_DECREF(src_out);
  Py_DECREF(dst_out);
  Py_DECREF(a);
  Py_DECREF(b);
  return r;
}

static PyObject* prepared_setup(PyObject* self, PyObject* args) {
  PyObject *tensor_type, *int64, *flags, *exchange, *storage_id, *empty;
  if (!PyArg_ParseTuple(args, "OOO!OOO:setup", &tensor_type, &int64, &PyDict_Type, &flags, &exchange,
                        &storage_id, &empty))
    return NULL;
  if ((storage_id != Py_None && !PyCallable_Check(storage_id)) || !PyCallable_Check(empty)) {
    PyErr_SetString(PyExc_TypeError, "setup: storage_id must be a callable or None, empty a callable");
    return NULL;
  }
  int (*to_dltensor)(void*, DLTensor*) = NULL;
  if (exchange != Py_None) {
    const DLPackExchangeAPI* api = PyCapsule_GetPointer(exchange, "dlpack_exchange_api");
    if (api == NULL) return NULL;
    /* only major version 1 has this layout; another one: the methods */
    if (api->header.version.major == 1) to_dltensor = api->dltensor_from_py_object_no_sync;
  }
  Py_XSETREF(g_tensor_type, Py_NewRef(tensor_type));
  Py_XSETREF(g_int64, Py_NewRef(int64));
  Py_XSETREF(g_flags, Py_NewRef(flags));
  Py_XSETREF(g_exchange_capsule, Py_NewRef(exchange));
  Py_XSETREF(g_storage_id, Py_NewRef(storage_id));
  Py_XSETREF(g_empty, Py_NewRef(empty));
  g_to_dltensor = to_dltensor;
  return PyBool_FromLong(to_dltensor != NULL);
}

static PyMethodDef methods[] = {
    {"setup", prepared_setup, METH_VARARGS,
     "setup(tensor_type, int64, flags, exchange, storage_id, empty) -> whether tensors are read "
     "through DLPack"},
    {"tensor_key", tensor_key, METH_O, "tensor_key(tensors) -> Key | None"},
    {"checked_pages", (PyCFunction)(void (*)(void))checked_pages, METH_FASTCALL,
     "checked_pages(src, dst, page_size) -> whether direct_indices takes them"},
    {"direct_indices", (PyCFunction)(void (*)(void))direct_indices, METH_FASTCALL,
     "direct_indices(src, dst, page_size, src_mode, dst_mode, outs) -> (src, dst, src_largest, "
     "dst_largest) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_prepared", "A prepared launch's per-call checks and C call.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__prepared(void) {
  s_dtype = PyUnicode_InternFromString("dtype");
  s_shape = PyUnicode_InternFromString("shape");
  s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
  s_get_device = PyUnicode_InternFromString("get_device");
  s_data_ptr = PyUnicode_InternFromString("data_ptr");
  s_record_stream = PyUnicode_InternFromString("record_stream");
  s_enabled = PyUnicode_InternFromString("_enabled");
  if (!s_dtype || !s_shape || !s_is_contiguous || !s_get_device || !s_data_ptr || !s_record_stream ||
      !s_enabled)
    return NULL;
  g_dtype_kw = Py_BuildValue("(s)", "dtype");
  if (g_dtype_kw == NULL) return NULL;
  if (PyType_Ready(&LaunchType) < 0 || PyType_Ready(&KeyType) < 0) return NULL;
  PyObject* m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  if (PyModule_AddObjectRef(m, "Launch", (PyObject*)&LaunchType) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
