//! `Slot`: a handle to one tensor of a graph that carries no lifetime, so the structs that name a
//! graph's inputs and outputs can be kept beside the graph (a kept graph and its handles live
//! together). A slot is only turned back into a tensor by the graph it came from, which checks that
//! the tensor is one of its own: a slot of another graph is an error, never a dangling pointer.

use std::ptr::NonNull;

use crate::backend::{Backend, NodeTime};
use crate::context::Tensor;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::reusable::ReusableGraph;

/// A graph tensor's handle, resolved with [`Graph::at`] or [`ReusableGraph::at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot(usize);

impl Tensor<'_> {
    /// This tensor's handle (see [`Slot`]).
    pub fn slot(self) -> Slot {
        Slot(self.raw() as usize)
    }
}

impl Slot {
    pub(crate) fn address(self) -> usize {
        self.0
    }
}

impl<'ctx> Graph<'ctx> {
    /// The graph's tensor behind `slot`: an error if it is not a tensor of this graph.
    pub fn at(&self, slot: Slot) -> Result<Tensor<'ctx>> {
        if !self.contains_address(slot.address()) {
            return Err(Error::invalid("Graph::at", "the slot is not a tensor of this graph"));
        }
        // The address is one of the graph's tensors, alive for 'ctx (the graph borrows its context).
        Ok(Tensor::from_raw(NonNull::new(slot.address() as *mut _).expect("graph tensors are non-null")))
    }
}

impl ReusableGraph {
    /// The kept graph's own tensor behind `slot` (an input to write, an output to read): an error for
    /// a slot of another graph, or of a tensor in a store (weights, cache rows), which the graph does
    /// not keep alive.
    pub fn at(&self, slot: Slot) -> Result<Tensor<'_>> {
        match self.own_tensor(slot.address()) {
            // The header is in the graph's context and its data in its buffer: both live as long as `&self`.
            Some(t) => Ok(Tensor::from_raw(t)),
            None => Err(Error::invalid("ReusableGraph::at", "the slot is not a tensor of this graph's own memory")),
        }
    }
}

/// A built graph ready to compute: fresh (allocated in a shared compute buffer, for one run) or kept
/// (with its own buffer, computed again and again). Inputs are written and outputs read through the
/// slots its builder returned, the same way in both cases.
#[derive(Clone, Copy)]
pub enum StepGraph<'g> {
    /// A graph built for this step and allocated in a shared compute buffer.
    Fresh(&'g Graph<'g>),
    /// A finished [`ReusableGraph`] with its own buffer, reused across steps.
    Kept(&'g ReusableGraph),
}

impl<'g> StepGraph<'g> {
    /// The tensor behind `slot` (see [`Graph::at`], [`ReusableGraph::at`]).
    pub fn at(self, slot: Slot) -> Result<Tensor<'g>> {
        match self {
            StepGraph::Fresh(graph) => graph.at(slot),
            StepGraph::Kept(graph) => graph.at(slot),
        }
    }

    /// Computes the graph on `backend` (see [`Backend::compute`], [`ReusableGraph::compute`]).
    pub fn compute(self, backend: &Backend) -> Result<()> {
        match self {
            StepGraph::Fresh(graph) => backend.compute(graph),
            StepGraph::Kept(graph) => graph.compute(backend),
        }
    }

    /// Computes node by node, timing each (see [`Backend::profile`]).
    pub fn profile(self, backend: &Backend) -> Result<Vec<NodeTime>> {
        match self {
            StepGraph::Fresh(graph) => backend.profile(graph),
            StepGraph::Kept(graph) => graph.profile(backend),
        }
    }
}
