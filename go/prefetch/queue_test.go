package prefetch

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

func k(l, e int32) cache.Key { return cache.Key{Layer: l, Expert: e} }

func drain(q *Queue) []Candidate {
	var out []Candidate
	for {
		c, ok := q.TryPop()
		if !ok {
			return out
		}
		out = append(out, c)
	}
}

func TestQueuePopsHighestScoreFirst(t *testing.T) {
	q := NewQueue()
	q.Update(1, []Candidate{{k(2, 0), 0.2}, {k(1, 3), 0.9}, {k(1, 1), 0.5}, {k(1, 2), 0.5}, {k(3, 3), 0}})
	assert.Equal(t, 4, q.Len(), "non-positive scores are ignored")
	assert.Equal(t, []Candidate{{k(1, 3), 0.9}, {k(1, 1), 0.5}, {k(1, 2), 0.5}, {k(2, 0), 0.2}}, q.Queued())
	assert.Equal(t, []Candidate{{k(1, 3), 0.9}, {k(1, 1), 0.5}, {k(1, 2), 0.5}, {k(2, 0), 0.2}}, drain(q))
}

func TestQueueUpdateCancelsStalePlan(t *testing.T) {
	q := NewQueue()
	q.Update(1, []Candidate{{k(1, 0), 0.5}, {k(2, 0), 0.4}})
	q.Update(1, []Candidate{{k(2, 0), 0.8}, {k(3, 1), 0.1}})
	assert.Equal(t, []Candidate{{k(2, 0), 0.8}, {k(3, 1), 0.1}}, drain(q))
	assert.Equal(t, uint64(1), q.Cancellations())
	assert.Equal(t, 0.0, q.Score(k(1, 0)))
}

func TestQueueMergesOwnersByMaxScore(t *testing.T) {
	q := NewQueue()
	q.Update(1, []Candidate{{k(1, 0), 0.3}})
	q.Update(2, []Candidate{{k(1, 0), 0.7}, {k(1, 1), 0.2}})
	assert.Equal(t, 0.7, q.Score(k(1, 0)))
	q.Update(2, nil) // owner 2 finished: owner 1's score remains
	assert.Equal(t, 0.3, q.Score(k(1, 0)))
	assert.Equal(t, 0.0, q.Score(k(1, 1)))
	assert.Equal(t, []Candidate{{k(1, 0), 0.3}}, drain(q))
}

func TestQueuePoppedEntriesKeepTheirScoreUntilReplanned(t *testing.T) {
	q := NewQueue()
	q.Update(1, []Candidate{{k(1, 0), 0.6}})
	c, ok := q.TryPop()
	require.True(t, ok)
	assert.Equal(t, k(1, 0), c.Key)
	assert.Equal(t, 0.6, q.Score(k(1, 0)), "a popped candidate still protects its expert")
	q.Requeue(k(1, 0))
	assert.Equal(t, 1, q.Len())
	q.Requeue(k(1, 0)) // already queued: no duplicate
	assert.Equal(t, 1, q.Len())
	q.Update(1, nil)
	assert.Equal(t, 0, q.Len())
	q.Requeue(k(1, 0)) // no longer planned: ignored
	assert.Equal(t, 0, q.Len())
}

func TestQueueCancel(t *testing.T) {
	q := NewQueue()
	q.Update(1, []Candidate{{k(1, 0), 0.6}, {k(1, 1), 0.5}})
	assert.True(t, q.Cancel(k(1, 0)))
	assert.False(t, q.Cancel(k(1, 0)))
	assert.False(t, q.Cancel(k(9, 9)))
	assert.Equal(t, []Candidate{{k(1, 1), 0.5}}, drain(q))
}

func TestQueuePopBlocksUntilWorkOrStop(t *testing.T) {
	q := NewQueue()
	got := make(chan Candidate, 1)
	go func() {
		c, ok := q.Pop(nil)
		assert.True(t, ok)
		got <- c
	}()
	time.Sleep(10 * time.Millisecond)
	q.Update(7, []Candidate{{k(4, 4), 1}})
	assert.Equal(t, Candidate{k(4, 4), 1}, <-got)

	stop := make(chan struct{})
	done := make(chan bool)
	go func() {
		_, ok := q.Pop(stop)
		done <- ok
	}()
	close(stop)
	assert.False(t, <-done)

	go func() {
		_, ok := q.Pop(nil)
		done <- ok
	}()
	time.Sleep(10 * time.Millisecond)
	q.Close()
	q.Close()
	assert.False(t, <-done)
	q.Update(1, []Candidate{{k(1, 1), 1}})
	assert.Equal(t, 0, q.Len(), "closed queue accepts nothing")
}

func TestQueueConcurrentUpdatesAndPops(t *testing.T) {
	q := NewQueue()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	popped := make(chan int, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := 0
			for {
				if _, ok := q.Pop(stop); !ok {
					popped <- n
					return
				}
				n++
			}
		}()
	}
	var up sync.WaitGroup
	for o := 0; o < 4; o++ {
		up.Add(1)
		go func(owner uint64) {
			defer up.Done()
			for i := 0; i < 200; i++ {
				q.Update(owner, []Candidate{{k(int32(i%8), int32(owner)), float64(i%5 + 1)}, {k(int32(i%3), 9), 0.5}})
				q.Score(k(1, 9))
			}
		}(uint64(o))
	}
	up.Wait()
	time.Sleep(20 * time.Millisecond)
	close(stop)
	wg.Wait()
	close(popped)
	total := 0
	for n := range popped {
		total += n
	}
	assert.Greater(t, total, 0)
}

func TestHintCandidatesOutrankPredictions(t *testing.T) {
	c := HintCandidates(3, []int32{5, 1})
	require.Len(t, c, 2)
	assert.Equal(t, Candidate{k(3, 5), HintScore}, c[0])
	assert.Greater(t, HintScore, 1.0)
}

func TestQueueClear(t *testing.T) {
	q := NewQueue()
	q.Update(1, []Candidate{{k(1, 0), 0.5}, {k(1, 1), 0.4}})
	q.Clear()
	assert.Equal(t, 0, q.Len())
	assert.Equal(t, 0.0, q.Score(k(1, 0)))
	assert.Equal(t, uint64(2), q.Cancellations())
}
