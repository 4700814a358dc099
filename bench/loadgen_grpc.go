// gRPC load generator in Go (google.golang.org/grpc, Debian's golang-google-grpc-dev,
// built in GOPATH mode by bench/load.py): unsigned refund.v1.RefundService/Refund
// calls, --concurrency in flight, each on a distinct order, for --duration seconds
// or until the orders run out. Same arguments and the same one-line JSON result as
// bench/loadgen_grpc.mjs and bench/loadgen_grpc.py.
//
// Why a third one: the load generator runs on the two cores of the chain it
// measures, so what it spends per call is taken from the service. wrk spends about
// 40-60 us per signed refund at the edge; Node's http2 about 240 us per gRPC call,
// which hid most of what the gRPC path saves. This one spends several times less.
//
// A request is a RefundRequest encoded by hand (field 1 merchant_id, 2 order_id,
// 4 amount) and sent as raw bytes (a codec that does not marshal); answers are
// not parsed, only their status is counted.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// grpc's status codes by number, as the other load generators name them.
var statusNames = []string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
	"UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = data
	return nil
}
func (rawCodec) Name() string { return "proto" }

type strings []string

func (s *strings) String() string     { return fmt.Sprint(*s) }
func (s *strings) Set(v string) error { *s = append(*s, v); return nil }

func refundRequest(merchant string, order uint64, amount string) []byte {
	message := []byte{0x0a, byte(len(merchant))}
	message = append(message, merchant...)
	message = append(message, 0x10)
	message = binary.AppendUvarint(message, order)
	message = append(message, 0x22, byte(len(amount)))
	return append(message, amount...)
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	index := int(math.Round(p/100*float64(len(sorted))+0.5)) - 1
	if index < 0 {
		index = 0
	}
	if index >= len(sorted) {
		index = len(sorted) - 1
	}
	return sorted[index]
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

func main() {
	var targets, merchants strings
	flag.Var(&targets, "target", "HOST:PORT of a service (repeatable)")
	flag.Var(&merchants, "merchant", "merchant id (repeatable; orders go round them)")
	amount := flag.String("amount", "10.00", "amount of every refund")
	first := flag.Uint64("first-order", 0, "first order id")
	orders := flag.Int("orders", 0, "number of orders")
	concurrency := flag.Int("concurrency", 32, "calls in flight")
	duration := flag.Float64("duration", 8, "seconds")
	procs := flag.Int("procs", 1, "GOMAXPROCS (1: no idle threads spinning on the cores being measured)")
	flag.Parse()
	runtime.GOMAXPROCS(*procs)
	if len(targets) == 0 || len(merchants) == 0 || *orders <= 0 {
		fmt.Fprintln(os.Stderr, "needs --target, --merchant and --orders")
		os.Exit(2)
	}

	conns := make([]*grpc.ClientConn, len(targets))
	for i, target := range targets {
		conn, err := grpc.Dial(target, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			fmt.Fprintln(os.Stderr, "cannot connect to", target, err)
			os.Exit(1)
		}
		conns[i] = conn
	}
	bodies := make([][]byte, *orders)
	for i := range bodies {
		bodies[i] = refundRequest(merchants[i%len(merchants)], *first+uint64(i), *amount)
	}

	var next int64 = -1
	var exhausted int32
	var mu sync.Mutex
	var wg sync.WaitGroup
	latencies := make([]float64, 0, *orders)
	codes := map[string]int{}
	cpu0, start := cpuSeconds(), time.Now()
	stopAt := start.Add(time.Duration(*duration * float64(time.Second)))
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(conn *grpc.ClientConn) {
			defer wg.Done()
			var mine []float64
			counts := map[string]int{}
			for {
				if !time.Now().Before(stopAt) {
					break
				}
				i := atomic.AddInt64(&next, 1)
				if i >= int64(len(bodies)) {
					atomic.StoreInt32(&exhausted, 1)
					break
				}
				began := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				var reply []byte
				err := conn.Invoke(ctx, "/refund.v1.RefundService/Refund", &bodies[i], &reply)
				cancel()
				mine = append(mine, float64(time.Since(began).Nanoseconds())/1e6)
				counts[statusNames[status.Code(err)]]++
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			for name, count := range counts {
				codes[name] += count
			}
			mu.Unlock()
		}(conns[w%len(conns)])
	}
	wg.Wait()
	seconds, cpu := time.Since(start).Seconds(), cpuSeconds()-cpu0
	for _, conn := range conns {
		conn.Close()
	}
	sort.Float64s(latencies)
	done := len(latencies)
	result := map[string]interface{}{
		"requests": done, "seconds": seconds, "rate": float64(done) / seconds,
		"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "codes": codes,
		"exhausted": exhausted == 1, "pid": os.Getpid(), "client": "go", "client_cpu_us": nil,
	}
	if done > 0 {
		result["client_cpu_us"] = cpu * 1e6 / float64(done)
	}
	line, _ := json.Marshal(result)
	fmt.Println(string(line))
}
