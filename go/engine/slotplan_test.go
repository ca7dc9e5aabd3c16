package engine

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSlotPlanIsTheLayoutConfigureMakes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		model func(*testing.T, *Engine, int, int)
		setup Setup
	}{
		{"bfloat16 experts", bf16Model, Setup{Layout: mixtralSpec}},
		{"FP8 experts: stored slots and dequantized views", quantModel, Setup{Layout: fp8Spec, FFN: "swiglu"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := New(Config{BudgetBytes: 1 << 30})
			require.NoError(t, err)
			t.Cleanup(func() { _ = e.Close() })
			tc.model(t, e, 2, 4)
			sp, err := e.SlotPlan(tc.setup)
			require.NoError(t, err)
			_, err = e.Plan()
			require.Error(t, err, "SlotPlan does not configure")

			p, err := e.Configure(tc.setup)
			require.NoError(t, err)
			assert.Equal(t, p.SlotBytes, sp.SlotBytes)
			if p.Stored != nil {
				assert.Equal(t, p.Stored, sp.Layout)
				assert.Equal(t, p.Views.Bytes, sp.ViewBytes)
				assert.Positive(t, sp.ViewBytes)
			} else {
				assert.Equal(t, p.Layout, sp.Layout)
				assert.Zero(t, sp.ViewBytes)
			}
			assert.Zero(t, sp.SlotBytes%sp.Layout.Alignment, "slots are whole multiples of the alignment")
		})
	}
}

func TestSlotPlanRejectsWhatConfigureRejects(t *testing.T) {
	e, err := New(Config{BudgetBytes: 1 << 30})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	_, err = e.SlotPlan(Setup{Layout: mixtralSpec})
	assert.ErrorIs(t, err, ErrInvalid, "no experts in the checkpoint")
	bf16Model(t, e, 1, 4)
	_, err = e.SlotPlan(Setup{Layout: mixtralSpec, Layers: []string{"model.layers.9.block_sparse_moe"}})
	assert.ErrorIs(t, err, ErrInvalid, "unknown layer")
	require.NoError(t, e.Close())
	_, err = e.SlotPlan(Setup{Layout: mixtralSpec})
	assert.ErrorIs(t, err, ErrClosed)
}
