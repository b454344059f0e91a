package fdmoe

// Tests on the CPU backend: a small f32 layer's output and routing record against a float64
// reference of SPEC §3 written out here, the errors each call returns (status and the
// argument named), and a Layer's lifetime. Run them with bindings/go/run_tests.sh, which
// also turns on cgo's full pointer checks (GODEBUG=cgocheck=2).

import (
	"errors"
	"math"
	"strings"
	"testing"
	"unsafe"
)

const (
	numExperts = 8
	topK       = 2
	hidden     = 64
	inter      = 32
	tokens     = 5
)

// xorshift64*: uniform values in [-scale, scale).
type rng uint64

func (r *rng) next(scale float64) float32 {
	*r ^= *r >> 12
	*r ^= *r << 25
	*r ^= *r >> 27
	u := float64((uint64(*r)*2685821657736338717)>>11) / 9007199254740992.0
	return float32((2*u - 1) * scale)
}

type layerWeights struct{ w13, w2, gate []float32 } // TORCH: [E, 2I, H], [E, H, I], [E, H]

func randomWeights() (layerWeights, []float32) {
	r := rng(0x2545f4914f6cdd1d)
	fill := func(n int, scale float64) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = r.next(scale)
		}
		return v
	}
	w := layerWeights{
		w13:  fill(numExperts*2*inter*hidden, 1/math.Sqrt(hidden)),
		w2:   fill(numExperts*hidden*inter, 1/math.Sqrt(inter)),
		gate: fill(numExperts*hidden, 1/math.Sqrt(hidden)),
	}
	return w, fill(tokens*hidden, 1)
}

// reference is SPEC §3 for one token: softmax top-k (ties to the lower id), renormalized,
// SwiGLU experts, weighted sum.
func reference(w layerWeights, x []float32) ([]float64, []int32) {
	probs := make([]float64, numExperts)
	max, sum := math.Inf(-1), 0.0
	for e := range probs {
		for h := 0; h < hidden; h++ {
			probs[e] += float64(w.gate[e*hidden+h]) * float64(x[h])
		}
		max = math.Max(max, probs[e])
	}
	for e := range probs {
		probs[e] = math.Exp(probs[e] - max)
		sum += probs[e]
	}
	ids := make([]int32, topK)
	weights := make([]float64, topK)
	chosen := 0.0
	for j := range ids {
		ids[j] = -1
		for e := 0; e < numExperts; e++ {
			taken := false
			for q := 0; q < j; q++ {
				taken = taken || ids[q] == int32(e)
			}
			if !taken && (ids[j] < 0 || probs[e] > probs[ids[j]]) {
				ids[j] = int32(e)
			}
		}
		weights[j] = probs[ids[j]] / sum
		chosen += weights[j]
	}
	out := make([]float64, hidden)
	act := make([]float64, inter)
	for j, id := range ids {
		w13 := w.w13[int(id)*2*inter*hidden:]
		w2 := w.w2[int(id)*hidden*inter:]
		for i := range act {
			g, u := 0.0, 0.0
			for h := 0; h < hidden; h++ {
				g += float64(w13[i*hidden+h]) * float64(x[h])
				u += float64(w13[(inter+i)*hidden+h]) * float64(x[h])
			}
			act[i] = g / (1 + math.Exp(-g)) * u
		}
		for h := range out {
			y := 0.0
			for i := range act {
				y += float64(w2[h*inter+i]) * act[i]
			}
			out[h] += weights[j] / chosen * y
		}
	}
	return out, ids
}

func smallConfig() Config {
	c := DefaultConfig()
	c.Backend = BackendCPU
	c.NumExperts, c.TopK, c.HiddenSize, c.IntermediateSize = numExperts, topK, hidden, inter
	c.ActDtype, c.WeightDtype = DtypeF32, DtypeF32
	c.MaxTokens = tokens
	c.NumThreads = 1
	return c
}

func hostWeights(w layerWeights) Weights {
	fw := DefaultWeights()
	fw.Dtype = DtypeF32
	fw.W13, fw.W2, fw.Gate = unsafe.Pointer(&w.w13[0]), unsafe.Pointer(&w.w2[0]), unsafe.Pointer(&w.gate[0])
	return fw
}

// expectError fails unless err is *Error with status and a message containing needle.
func expectError(t *testing.T, err error, status Status, needle, what string) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: want *Error %v, got %v", what, status, err)
	}
	if e.Status != status || !strings.Contains(e.Message, needle) {
		t.Fatalf("%s: want %v naming %q, got %v", what, status, needle, e)
	}
}

func newLoadedLayer(t *testing.T, w layerWeights) *Layer {
	t.Helper()
	l, err := NewLayer(smallConfig())
	if err != nil {
		t.Fatal(err)
	}
	if err := l.LoadWeights(hostWeights(w)); err != nil {
		t.Fatal(err)
	}
	return l
}

func TestForwardMatchesReference(t *testing.T) {
	if err := RequireCompatibleLibrary(); err != nil {
		t.Fatal(err)
	}
	if f, err := QueryFeatures(BackendCPU); err != nil || f&FeatureRoutingRecord == 0 {
		t.Fatalf("CPU features %#x, %v: want the routing record", f, err)
	}
	w, x := randomWeights()
	mem, err := QueryMemory(smallConfig())
	if err != nil || mem.HostWeightBytes < uint64(4*(len(w.w13)+len(w.w2))) {
		t.Fatalf("QueryMemory: %+v, %v", mem, err)
	}
	l := newLoadedLayer(t, layerWeights{
		w13: append([]float32(nil), w.w13...), w2: append([]float32(nil), w.w2...),
		gate: append([]float32(nil), w.gate...),
	}) // OWN: the library keeps its own copy of these
	defer l.Close()

	out := make([]float32, tokens*hidden)
	ids := make([]int32, tokens*topK)
	weights := make([]float32, tokens*topK)
	err = l.Forward(ForwardArgs{
		NumTokens: tokens, X: unsafe.Pointer(&x[0]), Out: unsafe.Pointer(&out[0]),
		TopkIDsOut: unsafe.Pointer(&ids[0]), TopkWeightsOut: unsafe.Pointer(&weights[0]),
	})
	if err != nil {
		t.Fatal(err)
	}
	var diff, norm float64
	for tok := 0; tok < tokens; tok++ {
		ref, refIDs := reference(w, x[tok*hidden:(tok+1)*hidden])
		for h, r := range ref {
			d := float64(out[tok*hidden+h]) - r
			diff += d * d
			norm += r * r
		}
		sum := 0.0
		for j := range refIDs {
			if ids[tok*topK+j] != refIDs[j] {
				t.Fatalf("token %d slot %d: expert %d, reference %d", tok, j, ids[tok*topK+j], refIDs[j])
			}
			sum += float64(weights[tok*topK+j])
		}
		if math.Abs(sum-1) > 1e-6 {
			t.Fatalf("token %d: renormalized weights sum to %v", tok, sum)
		}
	}
	if rel := math.Sqrt(diff / norm); !(norm > 0 && rel <= 1e-5) {
		t.Fatalf("relative L2 error %.3g, want <= 1e-5 (SPEC §8, f32)", rel)
	}

	// Given routing (the record replayed) reproduces the output bitwise.
	replay := make([]float32, len(out))
	err = l.Forward(ForwardArgs{
		NumTokens: tokens, X: unsafe.Pointer(&x[0]), Out: unsafe.Pointer(&replay[0]),
		TopkIDs: unsafe.Pointer(&ids[0]), TopkWeights: unsafe.Pointer(&weights[0]),
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range out {
		if math.Float32bits(out[i]) != math.Float32bits(replay[i]) {
			t.Fatalf("replayed routing: out[%d] = %v, first forward %v", i, replay[i], out[i])
		}
	}
}

func TestErrorsNameTheArgument(t *testing.T) {
	w, x := randomWeights()
	out := make([]float32, (tokens+1)*hidden)
	xs := append(x, make([]float32, hidden)...)

	bad := smallConfig()
	bad.NumExperts = 0
	_, err := NewLayer(bad)
	expectError(t, err, StatusInvalidArgument, "num_experts", "zero experts")
	_, err = QueryMemory(bad)
	expectError(t, err, StatusInvalidArgument, "num_experts", "QueryMemory validates as create does")
	if DefaultConfig().ActQuant != ActQuantNone {
		t.Fatal("act_quant defaults to NONE")
	}
	fp8mx := smallConfig()
	fp8mx.ActQuant = ActQuantFP8MX
	_, err = NewLayer(fp8mx)
	expectError(t, err, StatusUnsupported, "act_quant", "FP8_MX activations need MXFP4 experts")

	l, err := NewLayer(smallConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fwd := ForwardArgs{NumTokens: tokens, X: unsafe.Pointer(&xs[0]), Out: unsafe.Pointer(&out[0])}
	expectError(t, l.Forward(fwd), StatusInvalidState, "weights", "forward before LoadWeights")

	borrowed := hostWeights(w)
	borrowed.Ownership = OwnershipBorrow
	expectError(t, l.LoadWeights(borrowed), StatusUnsupported, "BORROW", "host BORROW from Go")
	perExpert := hostWeights(w)
	perExpert.Layout = LayoutPerExpert
	expectError(t, l.LoadWeights(perExpert), StatusUnsupported, "PER_EXPERT", "PER_EXPERT from Go")
	noW2 := hostWeights(w)
	noW2.W2 = nil
	expectError(t, l.LoadWeights(noW2), StatusNullArgument, "w2", "weights without w2")

	if err := l.LoadWeights(hostWeights(w)); err != nil {
		t.Fatal(err)
	}
	over := fwd
	over.NumTokens = tokens + 1
	expectError(t, l.Forward(over), StatusCapacityExceeded, "max_tokens", "more tokens than max_tokens")
	noX := fwd
	noX.X = nil
	expectError(t, l.Forward(noX), StatusNullArgument, "x", "forward without x")
	expectError(t, l.CaptureGraphs(nil, nil), StatusUnsupported, "cpu", "graphs on the CPU backend")
	expectError(t, l.CaptureGraphs([]uint32{1, 2}, nil), StatusUnsupported, "cpu", "buckets on the CPU backend")
	if err := l.Forward(fwd); err != nil {
		t.Fatalf("a valid forward after the errors: %v", err)
	}
}

func TestClosedLayer(t *testing.T) {
	w, x := randomWeights()
	l := newLoadedLayer(t, w)
	out := make([]float32, tokens*hidden)
	fwd := ForwardArgs{NumTokens: tokens, X: unsafe.Pointer(&x[0]), Out: unsafe.Pointer(&out[0])}
	if err := l.Forward(fwd); err != nil {
		t.Fatal(err)
	}
	l.Close()
	l.Close() // a no-op
	expectError(t, l.Forward(fwd), StatusInvalidState, "closed", "forward after Close")
	expectError(t, l.LoadWeights(hostWeights(w)), StatusInvalidState, "closed", "LoadWeights after Close")
}
