// Package fdmoe is the Go binding of libfdmoe, a fused Mixture-of-Experts layer engine: a
// thin cgo layer over the C API of include/fdmoe.h, whose comments define every field and
// error. A failed call returns *Error (the status and the library's message, which names the
// argument at fault); a Layer owns one backend handle until Close.
//
// Buffers are unsafe.Pointer: host memory (a Go slice's first element, or C memory) on the
// CPU backend, device pointers (unsafe.Pointer(uintptr(devicePtr))) and a CUstream on the
// CUDA backend. cgo forbids C from keeping a pointer to Go memory past a call, so the binding
// refuses what would: BORROW of host weights (the library copies them under OWN, the
// default) and the PER_EXPERT layout's arrays of pointers.
//
// Build: the header comes from include/ beside this module; link libfdmoe with
// CGO_LDFLAGS="-L<dir of libfdmoe.so> -Wl,-rpath,<dir>" (bindings/go/run_tests.sh does).
package fdmoe

/*
#cgo CFLAGS: -I${SRCDIR}/../../../include
#cgo LDFLAGS: -lfdmoe
#include <stdlib.h>
#include "fdmoe.h"

// The pointers travel as arguments, not inside a Go-allocated struct (cgo's pointer rules),
// and are set into the C struct here for the one call.
static FdmoeStatus go_load_weights(FdmoeBackend *b, FdmoeWeights w, const void *w13, const void *w2,
                                   const void *gate, const float *correction_bias, const void *fc1,
                                   const void *fc2, const void *shared_w13, const void *shared_w2,
                                   const void *w13_scale, const void *w2_scale,
                                   const float *w13_global_scale, const float *w2_global_scale) {
    w.w13 = w13;
    w.w2 = w2;
    w.gate = gate;
    w.correction_bias = correction_bias;
    w.fc1 = fc1;
    w.fc2 = fc2;
    w.shared_w13 = shared_w13;
    w.shared_w2 = shared_w2;
    w.w13_scale = w13_scale;
    w.w2_scale = w2_scale;
    w.w13_global_scale = w13_global_scale;
    w.w2_global_scale = w2_global_scale;
    return fdmoe_load_weights(b, &w);
}

static FdmoeStatus go_forward(FdmoeBackend *b, FdmoeForwardArgs a, const void *x, void *out,
                              const float *router_logits, const int32_t *topk_ids,
                              const float *topk_weights, int32_t *topk_ids_out,
                              float *topk_weights_out, void *stream) {
    a.x = x;
    a.out = out;
    a.router_logits = router_logits;
    a.topk_ids = topk_ids;
    a.topk_weights = topk_weights;
    a.topk_ids_out = topk_ids_out;
    a.topk_weights_out = topk_weights_out;
    a.stream = stream;
    return fdmoe_forward(b, &a);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// Status is an FdmoeStatus.
type Status uint32

const (
	StatusOK               Status = C.FDMOE_STATUS_OK
	StatusInvalidArgument  Status = C.FDMOE_STATUS_INVALID_ARGUMENT
	StatusNullArgument     Status = C.FDMOE_STATUS_NULL_ARGUMENT
	StatusUnsupported      Status = C.FDMOE_STATUS_UNSUPPORTED
	StatusCapacityExceeded Status = C.FDMOE_STATUS_CAPACITY_EXCEEDED
	StatusNoDevice         Status = C.FDMOE_STATUS_NO_DEVICE
	StatusCudaError        Status = C.FDMOE_STATUS_CUDA_ERROR
	StatusNcclError        Status = C.FDMOE_STATUS_NCCL_ERROR
	StatusOutOfMemory      Status = C.FDMOE_STATUS_OUT_OF_MEMORY
	StatusInvalidState     Status = C.FDMOE_STATUS_INVALID_STATE
	StatusInternal         Status = C.FDMOE_STATUS_INTERNAL
)

func (s Status) String() string { return C.GoString(C.fdmoe_status_string(C.uint32_t(s))) }

// Error is a call that did not return StatusOK.
type Error struct {
	Status  Status
	Call    string // the C function, or the binding's method that refused the call
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s: %s", e.Call, e.Status, e.Message) }

// call runs f, a libfdmoe call, and turns its status into *Error with the message the library
// left for the calling OS thread: the goroutine is locked to its thread from the call to the
// message read (it could otherwise resume on another thread between two cgo calls).
func call(name string, f func() C.FdmoeStatus) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if status := Status(f()); status != StatusOK {
		return &Error{Status: status, Call: name, Message: C.GoString(C.fdmoe_last_error_message())}
	}
	return nil
}

// The C API's enums, with the values of fdmoe.h.
type (
	BackendKind uint32
	Routing     uint32
	Scoring     uint32
	Activation  uint32
	Dtype       uint32
	Layout      uint32
	GateLayout  uint32
	Ownership   uint32
	Memory      uint32
	ActQuant    uint32
)

const (
	BackendCPU  BackendKind = C.FDMOE_BACKEND_KIND_CPU
	BackendCUDA BackendKind = C.FDMOE_BACKEND_KIND_CUDA

	RoutingSoftmaxTopk Routing = C.FDMOE_ROUTING_SOFTMAX_TOPK
	RoutingSigmoidTopk Routing = C.FDMOE_ROUTING_SIGMOID_TOPK
	RoutingGroupedTopk Routing = C.FDMOE_ROUTING_GROUPED_TOPK
	RoutingGiven       Routing = C.FDMOE_ROUTING_GIVEN

	ScoringSigmoid Scoring = C.FDMOE_SCORING_SIGMOID
	ScoringSoftmax Scoring = C.FDMOE_SCORING_SOFTMAX

	ActivationSwiglu         Activation = C.FDMOE_ACTIVATION_SWIGLU
	ActivationGeluTanhAndMul Activation = C.FDMOE_ACTIVATION_GELU_TANH_AND_MUL
	ActivationSwigluOAI      Activation = C.FDMOE_ACTIVATION_SWIGLUOAI

	DtypeF32      Dtype = C.FDMOE_DTYPE_F32
	DtypeBF16     Dtype = C.FDMOE_DTYPE_BF16
	DtypeF16      Dtype = C.FDMOE_DTYPE_F16
	DtypeFP8Block Dtype = C.FDMOE_DTYPE_FP8_BLOCK
	DtypeMXFP4    Dtype = C.FDMOE_DTYPE_MXFP4
	DtypeNVFP4    Dtype = C.FDMOE_DTYPE_NVFP4

	LayoutTorch     Layout = C.FDMOE_LAYOUT_TORCH
	LayoutPaddle    Layout = C.FDMOE_LAYOUT_PADDLE
	LayoutPerExpert Layout = C.FDMOE_LAYOUT_PER_EXPERT

	GateExpertsByHidden GateLayout = C.FDMOE_GATE_LAYOUT_EXPERTS_BY_HIDDEN
	GateHiddenByExperts GateLayout = C.FDMOE_GATE_LAYOUT_HIDDEN_BY_EXPERTS

	OwnershipOwn    Ownership = C.FDMOE_OWNERSHIP_OWN
	OwnershipBorrow Ownership = C.FDMOE_OWNERSHIP_BORROW

	MemoryHost   Memory = C.FDMOE_MEMORY_HOST
	MemoryDevice Memory = C.FDMOE_MEMORY_DEVICE

	ActQuantNone  ActQuant = C.FDMOE_ACT_QUANT_NONE
	ActQuantFP8MX ActQuant = C.FDMOE_ACT_QUANT_FP8_MX
)

// Feature bits of QueryFeatures (FDMOE_FEATURE_* in fdmoe.h).
const (
	FeatureRoutingRecord  uint64 = C.FDMOE_FEATURE_ROUTING_RECORD
	FeatureLatent         uint64 = C.FDMOE_FEATURE_LATENT
	FeatureSharedExperts  uint64 = C.FDMOE_FEATURE_SHARED_EXPERTS
	FeatureWeightFP8Block uint64 = C.FDMOE_FEATURE_WEIGHT_FP8_BLOCK
	FeatureWeightMXFP4    uint64 = C.FDMOE_FEATURE_WEIGHT_MXFP4
	FeatureWeightNVFP4    uint64 = C.FDMOE_FEATURE_WEIGHT_NVFP4
	FeatureCudaGraphs     uint64 = C.FDMOE_FEATURE_CUDA_GRAPHS
)

// Version is the loaded library's version ("0.2.0").
func Version() string { return C.GoString(C.fdmoe_version_string()) }

// RequireCompatibleLibrary fails unless the loaded library implements the ABI of the header
// this package was built with (same major version, minor at least the header's).
func RequireCompatibleLibrary() error {
	abi := uint32(C.fdmoe_abi_version())
	if abi>>16 != C.FDMOE_VERSION_MAJOR || abi&0xffff < C.FDMOE_VERSION_MINOR {
		return &Error{Status: StatusUnsupported, Call: "RequireCompatibleLibrary",
			Message: fmt.Sprintf("libfdmoe %s is older than or incompatible with fdmoe.h %d.%d",
				Version(), C.FDMOE_VERSION_MAJOR, C.FDMOE_VERSION_MINOR)}
	}
	return nil
}

// Config is FdmoeConfig: start from DefaultConfig.
type Config struct {
	Backend                BackendKind
	DeviceOrdinal          int32
	NumExperts             uint32
	TopK                   uint32
	HiddenSize             uint32
	IntermediateSize       uint32
	LatentSize             uint32
	SharedIntermediateSize uint32
	Routing                Routing
	Scoring                Scoring
	NGroup                 uint32
	TopkGroup              uint32
	Renormalize            bool
	RoutedScalingFactor    float32
	Activation             Activation
	ActDtype               Dtype
	WeightDtype            Dtype
	MaxTokens              uint32
	NumThreads             uint32
	EpSize                 uint32
	EpRank                 uint32
	ActQuant               ActQuant
}

// DefaultConfig is the library's defaults (fdmoe_config_init).
func DefaultConfig() Config {
	var c C.FdmoeConfig
	if err := call("fdmoe_config_init_sized", func() C.FdmoeStatus {
		return C.fdmoe_config_init_sized(&c, C.size_t(unsafe.Sizeof(c)))
	}); err != nil {
		panic(err) // only for a NULL pointer or a too small size, neither possible here
	}
	return Config{
		Backend: BackendKind(c.backend), DeviceOrdinal: int32(c.device_ordinal),
		NumExperts: uint32(c.num_experts), TopK: uint32(c.top_k), HiddenSize: uint32(c.hidden_size),
		IntermediateSize: uint32(c.intermediate_size), LatentSize: uint32(c.latent_size),
		SharedIntermediateSize: uint32(c.shared_intermediate_size), Routing: Routing(c.routing),
		Scoring: Scoring(c.scoring), NGroup: uint32(c.n_group), TopkGroup: uint32(c.topk_group),
		Renormalize: c.renormalize != 0, RoutedScalingFactor: float32(c.routed_scaling_factor),
		Activation: Activation(c.activation), ActDtype: Dtype(c.act_dtype), WeightDtype: Dtype(c.weight_dtype),
		MaxTokens: uint32(c.max_tokens), NumThreads: uint32(c.num_threads), EpSize: uint32(c.ep_size),
		EpRank: uint32(c.ep_rank), ActQuant: ActQuant(c.act_quant),
	}
}

func (g *Config) c() C.FdmoeConfig {
	var c C.FdmoeConfig
	c.struct_size = C.uint32_t(unsafe.Sizeof(c))
	c.backend = C.uint32_t(g.Backend)
	c.device_ordinal = C.int32_t(g.DeviceOrdinal)
	c.num_experts = C.uint32_t(g.NumExperts)
	c.top_k = C.uint32_t(g.TopK)
	c.hidden_size = C.uint32_t(g.HiddenSize)
	c.intermediate_size = C.uint32_t(g.IntermediateSize)
	c.latent_size = C.uint32_t(g.LatentSize)
	c.shared_intermediate_size = C.uint32_t(g.SharedIntermediateSize)
	c.routing = C.uint32_t(g.Routing)
	c.scoring = C.uint32_t(g.Scoring)
	c.n_group = C.uint32_t(g.NGroup)
	c.topk_group = C.uint32_t(g.TopkGroup)
	if g.Renormalize {
		c.renormalize = 1
	}
	c.routed_scaling_factor = C.float(g.RoutedScalingFactor)
	c.activation = C.uint32_t(g.Activation)
	c.act_dtype = C.uint32_t(g.ActDtype)
	c.weight_dtype = C.uint32_t(g.WeightDtype)
	c.max_tokens = C.uint32_t(g.MaxTokens)
	c.num_threads = C.uint32_t(g.NumThreads)
	c.ep_size = C.uint32_t(g.EpSize)
	c.ep_rank = C.uint32_t(g.EpRank)
	c.act_quant = C.uint32_t(g.ActQuant)
	return c
}

// MemoryRequirements is FdmoeMemoryRequirements: bytes a backend of a config allocates.
type MemoryRequirements struct {
	DeviceWeightBytes, DeviceWorkspaceBytes, DeviceGraphBytes uint64
	HostWeightBytes, HostWorkspaceBytes                       uint64
}

// QueryMemory reports what a backend of cfg would allocate, validating cfg as NewLayer does.
func QueryMemory(cfg Config) (MemoryRequirements, error) {
	c := cfg.c()
	var m C.FdmoeMemoryRequirements
	m.struct_size = C.uint32_t(unsafe.Sizeof(m))
	if err := call("fdmoe_query_memory", func() C.FdmoeStatus { return C.fdmoe_query_memory(&c, &m) }); err != nil {
		return MemoryRequirements{}, err
	}
	return MemoryRequirements{
		DeviceWeightBytes: uint64(m.device_weight_bytes), DeviceWorkspaceBytes: uint64(m.device_workspace_bytes),
		DeviceGraphBytes: uint64(m.device_graph_bytes), HostWeightBytes: uint64(m.host_weight_bytes),
		HostWorkspaceBytes: uint64(m.host_workspace_bytes),
	}, nil
}

// QueryFeatures is the Feature* bits backend implements in this build.
func QueryFeatures(backend BackendKind) (uint64, error) {
	var f C.uint64_t
	err := call("fdmoe_query_features", func() C.FdmoeStatus { return C.fdmoe_query_features(C.uint32_t(backend), &f) })
	return uint64(f), err
}

// Weights is FdmoeWeights (shapes and layouts in fdmoe.h): start from DefaultWeights.
type Weights struct {
	Layout            Layout
	Dtype             Dtype
	Memory            Memory
	Ownership         Ownership
	GateUpInterleaved bool
	GateDtype         Dtype
	GateLayout        GateLayout
	DenseDtype        Dtype
	W13, W2, Gate     unsafe.Pointer
	CorrectionBias    unsafe.Pointer // [E] f32
	FC1, FC2          unsafe.Pointer
	SharedW13         unsafe.Pointer
	SharedW2          unsafe.Pointer
	W13Scale, W2Scale unsafe.Pointer // pre-quantized formats
	W13GlobalScale    unsafe.Pointer // NVFP4: [E] f32
	W2GlobalScale     unsafe.Pointer
}

// DefaultWeights is the library's defaults (fdmoe_weights_init): TORCH, BF16, host, OWN.
func DefaultWeights() Weights {
	var w C.FdmoeWeights
	if err := call("fdmoe_weights_init_sized", func() C.FdmoeStatus {
		return C.fdmoe_weights_init_sized(&w, C.size_t(unsafe.Sizeof(w)))
	}); err != nil {
		panic(err)
	}
	return Weights{
		Layout: Layout(w.layout), Dtype: Dtype(w.dtype), Memory: Memory(w.memory), Ownership: Ownership(w.ownership),
		GateUpInterleaved: w.gate_up_interleaved != 0, GateDtype: Dtype(w.gate_dtype),
		GateLayout: GateLayout(w.gate_layout), DenseDtype: Dtype(w.dense_dtype),
	}
}

// ForwardArgs is FdmoeForwardArgs: X and Out are [T, H] of the config's act_dtype; the
// routing inputs and the record are optional (nil).
type ForwardArgs struct {
	NumTokens      uint32
	X, Out         unsafe.Pointer
	RouterLogits   unsafe.Pointer // [T, E] f32
	TopkIDs        unsafe.Pointer // [T, k] int32, with TopkWeights: given routing
	TopkWeights    unsafe.Pointer // [T, k] f32
	TopkIDsOut     unsafe.Pointer // [T, k] int32: the routing record
	TopkWeightsOut unsafe.Pointer // [T, k] f32
	Stream         unsafe.Pointer // CUstream on the CUDA backend, nil on the CPU one
	ForceEager     bool           // no graph replay for this call
}

// Layer is one MoE layer (a backend handle). Its methods may be called from any goroutine;
// the library serialises calls on one handle.
type Layer struct {
	mu     sync.RWMutex // Close waits for calls in flight
	handle *C.FdmoeBackend
}

// NewLayer validates cfg and creates the layer (fdmoe_create_backend).
func NewLayer(cfg Config) (*Layer, error) {
	c := cfg.c()
	var h *C.FdmoeBackend
	if err := call("fdmoe_create_backend", func() C.FdmoeStatus { return C.fdmoe_create_backend(&c, &h) }); err != nil {
		return nil, err
	}
	l := &Layer{handle: h}
	runtime.SetFinalizer(l, (*Layer).Close)
	return l, nil
}

// live runs the call f with the handle under the read lock, or fails once the layer is closed.
func (l *Layer) live(name string, f func(h *C.FdmoeBackend) C.FdmoeStatus) error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.handle == nil {
		return &Error{Status: StatusInvalidState, Call: name, Message: "the layer is closed"}
	}
	err := call(name, func() C.FdmoeStatus { return f(l.handle) })
	runtime.KeepAlive(l)
	return err
}

// LoadWeights loads (OWN: copies) the layer's weights (fdmoe_load_weights).
func (l *Layer) LoadWeights(w Weights) error {
	const name = "fdmoe_load_weights"
	if w.Ownership == OwnershipBorrow && w.Memory != MemoryDevice {
		return &Error{Status: StatusUnsupported, Call: name,
			Message: "weights.ownership BORROW of host memory: C may not keep pointers to Go memory (cgo); use OWN"}
	}
	if w.Layout == LayoutPerExpert {
		return &Error{Status: StatusUnsupported, Call: name,
			Message: "weights.layout PER_EXPERT: its pointer arrays cannot be passed from Go (cgo); use TORCH or PADDLE"}
	}
	var c C.FdmoeWeights
	c.struct_size = C.uint32_t(unsafe.Sizeof(c))
	c.layout = C.uint32_t(w.Layout)
	c.dtype = C.uint32_t(w.Dtype)
	c.memory = C.uint32_t(w.Memory)
	c.ownership = C.uint32_t(w.Ownership)
	if w.GateUpInterleaved {
		c.gate_up_interleaved = 1
	}
	c.gate_dtype = C.uint32_t(w.GateDtype)
	c.gate_layout = C.uint32_t(w.GateLayout)
	c.dense_dtype = C.uint32_t(w.DenseDtype)
	return l.live(name, func(h *C.FdmoeBackend) C.FdmoeStatus {
		return C.go_load_weights(h, c, w.W13, w.W2, w.Gate, (*C.float)(w.CorrectionBias), w.FC1, w.FC2,
			w.SharedW13, w.SharedW2, w.W13Scale, w.W2Scale, (*C.float)(w.W13GlobalScale),
			(*C.float)(w.W2GlobalScale))
	})
}

// Forward computes out = MoE(x) (fdmoe_forward).
func (l *Layer) Forward(a ForwardArgs) error {
	const name = "fdmoe_forward"
	var c C.FdmoeForwardArgs
	c.struct_size = C.uint32_t(unsafe.Sizeof(c))
	c.num_tokens = C.uint32_t(a.NumTokens)
	if a.ForceEager {
		c.flags = C.FDMOE_FORWARD_FORCE_EAGER
	}
	return l.live(name, func(h *C.FdmoeBackend) C.FdmoeStatus {
		return C.go_forward(h, c, a.X, a.Out, (*C.float)(a.RouterLogits), (*C.int32_t)(a.TopkIDs),
			(*C.float)(a.TopkWeights), (*C.int32_t)(a.TopkIDsOut), (*C.float)(a.TopkWeightsOut), a.Stream)
	})
}

// CaptureGraphs captures CUDA graphs for the token buckets (nil: the default ones) on stream
// (fdmoe_capture_prefill_graph); CUDA backend only.
func (l *Layer) CaptureGraphs(tokenCounts []uint32, stream unsafe.Pointer) error {
	const name = "fdmoe_capture_prefill_graph"
	var counts *C.uint32_t
	if len(tokenCounts) > 0 {
		counts = (*C.uint32_t)(unsafe.Pointer(&tokenCounts[0]))
	}
	if uint64(len(tokenCounts)) > 1<<32-1 {
		return &Error{Status: StatusInvalidArgument, Call: name, Message: "token_counts: more than 2^32 buckets"}
	}
	return l.live(name, func(h *C.FdmoeBackend) C.FdmoeStatus {
		return C.fdmoe_capture_prefill_graph(h, counts, C.uint32_t(len(tokenCounts)), stream)
	})
}

// Close frees the layer and everything it owns; later calls fail with StatusInvalidState.
// Closing twice is a no-op.
func (l *Layer) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.handle != nil {
		C.fdmoe_destroy_backend(l.handle)
		l.handle = nil
		runtime.SetFinalizer(l, nil)
	}
}
