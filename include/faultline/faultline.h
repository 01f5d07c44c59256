/* The C ABI of faultline: opaque handles, faultline_noun_verb() names.
 * Functions returning int return 0 (or a count) on success and -errno on
 * error; functions returning pointers return NULL and set errno on error.
 * After an error, faultline_last_error() gives a message naming the problem
 * (thread-local, valid until the next failing call on the same thread).
 * No call allocates an error string the caller must free.
 * Thread-safety: a reader may be used from many threads at once; a builder
 * from one thread at a time. */
#ifndef FAULTLINE_H
#define FAULTLINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct faultline_reader faultline_reader;
typedef struct faultline_builder faultline_builder;

/* Element types (values match the C++ faultline::DType). */
enum faultline_dtype {
  FAULTLINE_DTYPE_F64 = 0, FAULTLINE_DTYPE_F32, FAULTLINE_DTYPE_F16, FAULTLINE_DTYPE_BF16,
  FAULTLINE_DTYPE_F8_E4M3, FAULTLINE_DTYPE_F8_E5M2,
  FAULTLINE_DTYPE_I64, FAULTLINE_DTYPE_I32, FAULTLINE_DTYPE_I16, FAULTLINE_DTYPE_I8,
  FAULTLINE_DTYPE_U64, FAULTLINE_DTYPE_U32, FAULTLINE_DTYPE_U16, FAULTLINE_DTYPE_U8,
  FAULTLINE_DTYPE_BOOL
};

enum faultline_codec { FAULTLINE_CODEC_RAW = 0, FAULTLINE_CODEC_ZSTD = 1 };

/* The library version, e.g. "0.1.0". */
const char* faultline_version(void);
/* 1 when the CUDA tier is built in and a GPU is usable, else 0. */
int faultline_has_cuda(void);
/* The message of this thread's last failed call ("" if none). */
const char* faultline_last_error(void);

/* ---- reading ---- */

/* Opens and checks a bundle. Returns -errno on error, or zero on success. */
int faultline_reader_open(const char* path, faultline_reader** out);
/* Closes a reader; NULL is ignored. */
void faultline_reader_close(faultline_reader* reader);

/* Number of models (>= 0). */
int faultline_reader_model_count(const faultline_reader* reader);
/* Name of model `model`; NULL+errno (ERANGE) for a bad index. Valid until close. */
const char* faultline_reader_model_name(const faultline_reader* reader, int model);
/* Number of tensors of model `model`, or -ERANGE. */
int faultline_reader_tensor_count(const faultline_reader* reader, int model);

/* Description of one tensor; pointers stay valid until the reader is closed.
 * Set struct_size = sizeof(faultline_tensor_info) before the call, so the
 * struct can grow. */
typedef struct faultline_tensor_info {
  size_t struct_size;
  const char* name;
  int dtype;                /* enum faultline_dtype */
  int codec;                /* enum faultline_codec */
  int ndim;
  const uint64_t* shape;
  uint64_t size;            /* bytes, uncompressed */
  uint64_t stored_size;     /* bytes of its frames as stored */
  uint32_t page_size;
  uint64_t frame_count;
} faultline_tensor_info;

/* Returns -errno on error, or zero on success. */
int faultline_reader_tensor_info(const faultline_reader* reader, int model, int tensor,
                                 faultline_tensor_info* out);
/* Finds a tensor by model and tensor name. Returns -ENOENT when absent. */
int faultline_reader_find(const faultline_reader* reader, const char* model, const char* tensor,
                          int* model_index, int* tensor_index);
/* Reads a whole tensor (checked, decompressed on all cores) into dst, whose
 * length must be the tensor's size. Returns -errno on error, or zero. */
int faultline_reader_read_tensor(const faultline_reader* reader, int model, int tensor, void* dst,
                                 size_t len);
/* Reads frame `frame` of a tensor; len >= the frame's length. Returns the
 * frame's length, or -errno. */
int64_t faultline_reader_read_frame(const faultline_reader* reader, int model, int tensor,
                                    uint64_t frame, void* dst, size_t len);
/* Checks every frame. Returns -EBADMSG (or another -errno) naming the first
 * bad frame in faultline_last_error(), or zero. */
int faultline_reader_verify(const faultline_reader* reader);

/* ---- writing ---- */

typedef struct faultline_tensor_options {
  int codec;          /* enum faultline_codec; default zstd */
  int level;          /* zstd level; default 3 */
  int shuffle;        /* non-zero: byte-shuffle filter */
  uint32_t page_size; /* power of two in [4 KiB, 64 MiB]; default 64 KiB */
} faultline_tensor_options;

/* Fills `opts` with the defaults. */
void faultline_tensor_options_init(faultline_tensor_options* opts);

/* Returns -errno on error, or zero on success. */
int faultline_builder_new(faultline_builder** out);
/* Tensors added from now on store a frame compressed only if it shrinks
 * `min_ratio` times or more, verbatim otherwise (TensorOptions::min_ratio;
 * default 1: any saving). -EINVAL below 1 or not a number. */
int faultline_builder_set_min_ratio(faultline_builder* builder, double min_ratio);
void faultline_builder_free(faultline_builder* builder);
/* Adds a model; returns its index (>= 0) or -errno. */
int faultline_builder_add_model(faultline_builder* builder, const char* name);
/* Sets a free-form metadata key/value of a model. */
int faultline_builder_set_metadata(faultline_builder* builder, int model, const char* key,
                                   const char* value);
/* Adds a tensor. `data` (len bytes) must stay valid until build returns.
 * opts may be NULL for the defaults. A bad argument (NULL, unknown dtype or
 * codec) fails here; a bad name, page size, or a length that disagrees with
 * dtype and shape is reported by faultline_builder_build. */
int faultline_builder_add_tensor(faultline_builder* builder, int model, const char* name,
                                 int dtype, const uint64_t* shape, int ndim, const void* data,
                                 size_t len, const faultline_tensor_options* opts);
/* Writes the bundle atomically. Returns -errno on error, or zero. */
int faultline_builder_build(faultline_builder* builder, const char* path);

/* ---- demand paging ---- */

typedef struct faultline_paged faultline_paged;

enum faultline_policy { FAULTLINE_POLICY_LRU = 0, FAULTLINE_POLICY_LFU, FAULTLINE_POLICY_PLAN };
enum faultline_mode {
  FAULTLINE_MODE_AUTO = 0, FAULTLINE_MODE_UFFD, FAULTLINE_MODE_GUARD, FAULTLINE_MODE_MMAP
};

typedef struct faultline_paging_config {
  size_t struct_size;       /* sizeof(faultline_paging_config) */
  uint64_t max_resident;    /* bytes; default 100 MB */
  int policy;               /* enum faultline_policy */
  int mode;                 /* enum faultline_mode */
  unsigned prefetch_depth;  /* frames of readahead at most; 0 = off */
  unsigned workers;         /* fault-service threads; 0 = cores */
} faultline_paging_config;

/* Fills `config` with the defaults overridden by the FAULTLINE_* environment. */
void faultline_paging_config_init(faultline_paging_config* config);

/* Opens a bundle for demand paging; config NULL = faultline_paging_config_init.
 * Returns -errno on error, or zero on success. */
int faultline_paged_open(const char* path, const faultline_paging_config* config,
                         faultline_paged** out);
/* Unmaps every tensor; pointers become invalid. NULL is ignored. */
void faultline_paged_close(faultline_paged* paged);
/* The mapped tensor (model NULL = the first model); its size in *size if
 * size is not NULL. NULL+errno (ENOENT) when absent. Valid until close. */
const void* faultline_paged_tensor(faultline_paged* paged, const char* model, const char* tensor,
                                   uint64_t* size);
/* Hints on a tensor. Return -errno on error, or zero. */
int faultline_paged_prefetch(faultline_paged* paged, const char* model, const char* tensor);
int faultline_paged_dont_need(faultline_paged* paged, const char* model, const char* tensor);
int faultline_paged_pin(faultline_paged* paged, const char* model, const char* tensor);
int faultline_paged_unpin(faultline_paged* paged, const char* model, const char* tensor);
/* The execution plan: one step per prefix of tensor names (the tensors of a
 * step are used together, such as one operation's weight and bias), in the
 * order of one pass (model NULL = the first model). -ENOENT names a prefix
 * no tensor starts with. */
int faultline_paged_set_plan(faultline_paged* paged, const char* model, const char* const* prefixes,
                             size_t count);
/* The pass reached this tensor's step: prefetches the steps that follow. */
int faultline_paged_advance(faultline_paged* paged, const char* model, const char* tensor);

/* Versioned, size-prefixed statistics: set struct_size before the call; the
 * library fills what both sides know and sets version. */
typedef struct faultline_paging_stats {
  size_t struct_size;
  uint32_t version;         /* 3 */
  uint64_t faults, fault_waits, loads, prefetched, evictions, errors;
  uint64_t bytes_read, bytes_decompressed;
  uint64_t resident_bytes, peak_resident_bytes, budget_bytes;
  double latency_p50_us, latency_p90_us, latency_p99_us, latency_max_us;
  /* version 2: huge units (README: huge units) */
  uint64_t huge_installs, huge_recycled;
  /* version 3 */
  uint64_t huge_split;
} faultline_paging_stats;

int faultline_paged_stats(const faultline_paged* paged, faultline_paging_stats* out);

/* ---- managed memory (see faultline/alloc.hpp) ----
 * The process-wide heap: blocks of at least FAULTLINE_THRESHOLD bytes live
 * under the FAULTLINE_BUDGET resident budget, cold chunks compressed and
 * spilled to disk; smaller ones, and all of them where userfaultfd is not
 * allowed, come from malloc. NULL + errno ENOMEM when memory cannot be had. */
void* faultline_alloc(size_t size);
void faultline_free(void* p);
void* faultline_realloc(void* p, size_t size);
/* madvise for that memory: on managed blocks MADV_WILLNEED reads spilled
 * chunks back in the background, MADV_PAGEOUT spills them now, MADV_COLD
 * makes them the next to go, MADV_DONTNEED zeroes; other addresses and
 * advice go to the kernel. 0, or -errno. */
int faultline_advise(void* p, size_t len, int advice);

/* ---- GPU tier (CUDA managed memory; see faultline/cuda.hpp) ----
 * Without CUDA or a device, faultline_device_open fails with -ENOTSUP.
 * Streams are cudaStream_t passed as void* (NULL = the default stream). */
typedef struct faultline_device faultline_device;
enum faultline_eviction { FAULTLINE_EVICT_TO_HOST = 0, FAULTLINE_EVICT_DISCARD };
enum faultline_gpu_memory { FAULTLINE_GPU_MANAGED = 0, FAULTLINE_GPU_MAPPED };
typedef struct faultline_device_config {
  size_t struct_size;      /* sizeof(faultline_device_config) */
  int device;
  uint64_t gpu_budget;     /* bytes on the GPU; 0 = half the free device memory */
  uint64_t host_budget;    /* bytes of decoded host copies; 0 = no limit */
  unsigned lookahead;      /* plan steps prefetched ahead */
  int eviction;            /* enum faultline_eviction */
  int read_mostly;         /* non-zero: cudaMemAdviseSetReadMostly on every tensor */
  int monitor;             /* non-zero: watch memory pressure */
  double offload, emergency, reload;  /* thresholds (fractions), GPU and host */
  int direct_host;         /* non-zero: pager pointers instead of managed memory (HMM) */
  int memory;              /* enum faultline_gpu_memory; absent from a struct_size that ends before it: the default */
} faultline_device_config;
void faultline_device_config_init(faultline_device_config* config);
int faultline_device_open(const char* path, const faultline_device_config* config, faultline_device** out);
void faultline_device_close(faultline_device* device);
/* The tensor's device-usable pointer (model NULL = the first model). */
void* faultline_device_tensor(faultline_device* device, const char* model, const char* tensor, uint64_t* size);
/* One plan step per prefix of tensor names. */
int faultline_device_set_plan(faultline_device* device, const char* model, const char* const* prefixes,
                              size_t count);
/* Step `step` is usable by work queued on `stream` after begin returns;
 * end says that work has been queued. */
int faultline_device_begin(faultline_device* device, size_t step, void* stream);
/* The tensor was changed: never discarded, spilled through the allocator
 * when it leaves the host (DeviceBundle::MarkWritten). */
int faultline_device_mark_written(faultline_device* device, const char* model, const char* tensor);
int faultline_device_end(faultline_device* device, size_t step, void* stream);
typedef struct faultline_device_counters {
  size_t struct_size;
  uint32_t version;        /* 1 */
  uint64_t to_device, bytes_to_device, to_host, bytes_to_host, discards, bytes_discarded;
  uint64_t decodes, bytes_decoded, errors;
  uint64_t device_resident, peak_device_resident, host_resident, gpu_budget;
  uint64_t offloads, emergencies, reloads, host_drops;
} faultline_device_counters;
int faultline_device_stats(const faultline_device* device, faultline_device_counters* out);

#ifdef __cplusplus
}
#endif

#endif /* FAULTLINE_H */
